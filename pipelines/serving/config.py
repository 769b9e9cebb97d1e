"""Configuration of the Serve application: which models, request limits, scaling, HTTP.

`ServeConfig` is what `python pipelines/serve.py --config ...` and `build_app` fill from a preset
(configs/serve/*.yaml) plus dotted overrides. The sections travel to the replicas as plain dicts:
`model` as the Models deployment's `user_config` (so editing it reloads without a restart),
`scaling` and `limits` as constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from reptok_core.config import Switch, opt, section
from reptok_core.device import Precision


@dataclass
class ModelSettings:
    tokenizer: str = opt(
        "",
        "tokenizer: an export folder (path or s3://), models:/<name>@<alias> or models:/<name>/<v>",
    )
    generator: str = opt("", "class-conditional generator reference ('' = /generate answers 404)")
    text_generator: str = opt("", "text-conditioned generator ('' = /text-to-image answers 404)")
    mlflow_uri: str = opt("", "tracking URI for models:/ references (default $MLFLOW_TRACKING_URI)")
    reload_poll_s: float = opt(
        0.0, "check registry aliases every N seconds and reload when one moved (0 = never)"
    )
    cache_dir: str = opt("", "where registry versions are downloaded ('' = the temp folder)")
    precision: Precision = opt(
        Precision.AUTO,
        "weights of the decoder, the SD-VAE and the generators: bf16, fp32, or auto (bf16 on a "
        "GPU that has it); the ODE state and the encoder stay fp32",
    )
    compile: Switch = opt(
        Switch.AUTO,
        "torch.compile every decoder and class-mixer block: auto (on a GPU), on, off. "
        "One 256-px image on an H200: 0.155 s instead of 0.265 s; the first request of a new "
        "batch bucket compiles (10-20 s)",
    )
    warmup_steps: int = opt(
        50,
        "on a GPU, run each loaded model twice at batch 1 with this many steps (and the "
        "generator's own guidance scale) before serving, so the first requests find compiled blocks "
        "and captured graphs; set it to limits.default_steps; 0 = no warm-up",
    )
    max_graphs: int = opt(
        32, "CUDA graphs kept per replica, one per (batch bucket, steps, guidance scale); 0 = eager"
    )


@dataclass
class LimitSettings:
    max_n: int = opt(16, "most images per /generate, /text-to-image or /interpolate request")
    max_steps: int = opt(250, "most sampling steps a request may ask for")
    default_steps: int = opt(50, "sampling steps when a request does not say (the paper's 50)")
    max_upload_bytes: int = opt(10_000_000, "largest accepted image upload, in bytes")
    max_pixels: int = opt(40_000_000, "largest accepted image, width x height (checked pre-decode)")
    max_prompt_chars: int = opt(1000, "longest accepted text prompt")
    max_guidance_scale: float = opt(20.0, "largest classifier-free guidance scale")


@dataclass
class ScalingSettings:
    use_gpu: Switch = opt(
        Switch.AUTO, "a GPU per model replica: auto (when the cluster has GPUs), on, off"
    )
    model_cpus: float = opt(1.0, "CPUs reserved per model replica")
    ingress_cpus: float = opt(0.5, "CPUs reserved per ingress replica")
    ingress_replicas: int = opt(1, "ingress (HTTP parsing / PNG encoding) replicas")
    min_replicas: int = opt(1, "autoscaling: fewest model replicas (0 scales to zero when idle)")
    max_replicas: int = opt(1, "autoscaling: most model replicas")
    target_ongoing_requests: float = opt(8.0, "autoscaling: in-flight requests per model replica")
    max_batch_size: int = opt(16, "largest encode / decode batch a model replica runs at once")
    batch_wait_timeout_s: float = opt(0.02, "how long a partial batch waits for more requests")


@dataclass
class HttpSettings:
    host: str = opt("127.0.0.1", "interface to bind; 0.0.0.0 exposes the service to the network")
    port: int = opt(8000, "HTTP port")
    route_prefix: str = opt("/", "URL prefix of the application")
    app_name: str = opt("reptok", "Serve application name")


@dataclass
class ServeConfig:
    model: ModelSettings = section(ModelSettings, "which models to serve and how to reload them")
    limits: LimitSettings = section(LimitSettings, "request validation limits")
    scaling: ScalingSettings = section(ScalingSettings, "replicas, autoscaling, batching, GPU")
    http: HttpSettings = section(HttpSettings, "where the HTTP proxy listens")
