"""Read the official RepTok release (`reptok-xl-600k-ImageNet.ckpt`) without running its pickle.

The release is a Lightning checkpoint: a torch zip archive whose pickle holds the state dict
and `hyper_parameters` made of OmegaConf objects. Plain `torch.load(weights_only=True)` refuses
those objects; `weights_only=False` would import OmegaConf and run whatever the pickle names.
Here a restricted unpickler rebuilds tensors with torch's own functions and turns every other
class into inert data:

- OmegaConf containers are pickled as their `__dict__`: a DictConfig/ListConfig keeps its
  values in `_content` (a dict or list of nodes, or None / "???" / an "${...}" string), a leaf
  node (AnyNode, IntegerNode, ...) in `_val`; `_metadata` and `_parent` (type info and a link
  back up the tree) are dropped. So `hyper_parameters['first_stage_cfg']['params']
  ['scale_factor']` comes back as a float. Interpolations stay unresolved strings.
- enum members and other objects rebuilt from arguments become their argument(s); objects
  rebuilt from state become a dict of that state; class references (typing.Any, dict, ...)
  become their dotted name.

Tensors are memory-mapped (the release holds ~2.4B parameters, ~10 GB), so reading it costs
no RAM until a tensor is touched.

`official_parts` sorts the state dict into the release's components (see `PARTS`); mapping
those onto this project's models is reptok_core/official/convert.py's job.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import pickle
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class OfficialCheckpointError(ValueError):
    """The file is not (or not entirely) an official RepTok checkpoint; names what is wrong."""


# ------------------------------------------------------------------ restricted unpickling
_SAFE_BUILTINS = {
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bytearray",
    "bool",
    "slice",
}
_SAFE_TORCH = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "UntypedStorage"),
}


class _Opaque:
    """Stands for a class the checkpoint names but we refuse to import. Records whatever the
    pickle feeds it (constructor arguments, BUILD state, set items, appended items)."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        obj = object.__new__(cls)
        obj.__dict__.update(_args=args, _state=None, _items={}, _list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items[key] = value

    def append(self, value: Any) -> None:
        self._list.append(value)

    def extend(self, values: Any) -> None:
        self._list.extend(values)


_opaque_classes: dict[tuple[str, str], type] = {}


def _opaque_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _opaque_classes:
        _opaque_classes[key] = type(name, (_Opaque,), {"_qualname": f"{module}.{name}"})
    return _opaque_classes[key]


class _RestrictedUnpickler(pickle.Unpickler):
    """Only torch's tensor rebuilders, storages (handled by torch.load before this is asked),
    OrderedDict, dtypes and plain builtin types are real; everything else is `_Opaque`."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("builtins", "__builtin__"):
            if name == "long":
                return int
            if name in _SAFE_BUILTINS:
                return getattr(builtins, name)
        if (module, name) in _SAFE_TORCH:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _opaque_class(module, name)


def _pickle_module(storages: list[tuple]) -> types.ModuleType:
    """What torch.load takes as `pickle_module`: our Unpickler, which also records every storage
    the pickle asks for (key, dtype, element count) so their sizes can be checked afterwards
    (a memory-mapped load reads past a short record without noticing)."""

    class Unpickler(_RestrictedUnpickler):
        def load(self) -> Any:
            torch_persistent_load = self.persistent_load  # set by torch.load

            def persistent_load(pid: Any) -> Any:
                if isinstance(pid, tuple) and len(pid) == 5:
                    _, storage_type, key, _, numel = pid
                    dtype = getattr(storage_type, "dtype", torch.uint8)
                    storages.append((str(key), dtype, int(numel)))
                return torch_persistent_load(pid)

            self.persistent_load = persistent_load
            return super().load()

    module = types.ModuleType("reptok_restricted_pickle")
    module.Unpickler = Unpickler
    module.load = lambda file, **kw: Unpickler(file, **kw).load()
    module.UnpicklingError = pickle.UnpicklingError
    return module


def to_plain(obj: Any) -> Any:
    """Opaque objects (OmegaConf containers and nodes, enums, ...) -> dicts/lists/scalars."""
    return _Plain().convert(obj)


class _Plain:
    def __init__(self) -> None:
        self.active: set[int] = set()  # ids being converted: cuts reference cycles

    def convert(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) or obj is None:
            return obj
        if isinstance(obj, str | bytes | int | float | complex | bool | torch.dtype):
            return obj
        if isinstance(obj, type):
            if issubclass(obj, _Opaque):
                return obj._qualname
            return f"{obj.__module__}.{obj.__qualname__}"
        if id(obj) in self.active:
            return None
        self.active.add(id(obj))
        try:
            return self._convert(obj)
        finally:
            self.active.discard(id(obj))

    def _convert(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
            for k, v in obj.items():
                out[self.convert(k)] = self.convert(v)
            return out
        if isinstance(obj, list | tuple | set | frozenset):
            items = [self.convert(v) for v in obj]
            return tuple(items) if isinstance(obj, tuple) else items
        if isinstance(obj, _Opaque):
            return self._opaque(obj)
        return obj  # torch.Size, torch.device, slices: already inert

    def _opaque(self, obj: _Opaque) -> Any:
        state = obj._state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (__dict__, __slots__) state
        if isinstance(state, dict):
            if "_content" in state:  # OmegaConf DictConfig / ListConfig / UnionNode
                return self.convert(state["_content"])
            if "_val" in state:  # OmegaConf leaf node
                return self.convert(state["_val"])
        if obj._items:
            return {self.convert(k): self.convert(v) for k, v in obj._items.items()}
        if obj._list:
            return [self.convert(v) for v in obj._list]
        if state is not None:
            return self.convert(state)
        args = obj._args
        if obj._qualname.startswith("pathlib.") and all(isinstance(a, str) for a in args):
            return str(Path(*args))
        if len(args) == 1:  # enum members, and the like, rebuilt from one value
            return self.convert(args[0])
        if args:
            return [self.convert(a) for a in args]
        return obj._qualname


# ------------------------------------------------------------------ reading the file
@dataclass
class OfficialCheckpoint:
    state_dict: dict[str, torch.Tensor]
    hyper_parameters: dict[str, Any]  # plain nested dicts/lists/scalars
    extra: dict[str, Any] = field(default_factory=dict)  # the other top-level entries, plain


def _open_zip(path: Path) -> dict[str, int]:
    """Checks the archive; its record sizes by name."""
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise OfficialCheckpointError(
            f"{path}: not a PyTorch checkpoint (expected a torch.save zip archive, the file "
            f"starts with {head!r})"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = {i.filename: i.file_size for i in zf.infolist()}
    except zipfile.BadZipFile as e:
        raise OfficialCheckpointError(
            f"{path}: truncated or corrupt checkpoint (the zip archive is unreadable: {e})"
        ) from e
    if not any(n.endswith("/data.pkl") for n in sizes):
        raise OfficialCheckpointError(f"{path}: a zip archive but not a torch.save checkpoint")
    if any(n.endswith("/constants.pkl") for n in sizes):
        raise OfficialCheckpointError(f"{path}: a TorchScript archive, not a Lightning checkpoint")
    return sizes


def _check_storage_sizes(path: Path, sizes: dict[str, int], storages: list[tuple]) -> None:
    by_key = {name.rsplit("/data/", 1)[1]: n for name, n in sizes.items() if "/data/" in name}
    for key, dtype, numel in storages:
        want = numel * torch.empty((), dtype=dtype).element_size()
        have = by_key.get(key)
        if have is None or have < want:
            raise OfficialCheckpointError(
                f"{path}: truncated or corrupt checkpoint (tensor record data/{key} holds "
                f"{have} bytes, its tensor needs {want})"
            )


def load_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """The release's state dict (memory-mapped tensors) and plain-data hyper-parameters.

    Nothing the pickle names is imported or run apart from torch's tensor rebuilders."""
    path = Path(path)
    sizes = _open_zip(path)
    storages: list[tuple] = []
    try:
        raw = torch.load(
            path,
            map_location="cpu",
            mmap=True,
            weights_only=False,  # required with a custom pickle_module, which is the safe one
            pickle_module=_pickle_module(storages),
        )
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise OfficialCheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from e
    _check_storage_sizes(path, sizes, storages)
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        what = sorted(map(str, raw))[:8] if isinstance(raw, dict) else type(raw).__name__
        raise OfficialCheckpointError(
            f"{path}: not a Lightning checkpoint (no 'state_dict'; found {what})"
        )
    sd = raw["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    needs = ("first_stage.", "model.net.")
    if not all(any(k.startswith(p) for k in sd) for p in needs):
        raise OfficialCheckpointError(
            f"{path}: not a RepTok checkpoint (its state_dict has no first_stage.* and "
            f"model.net.* keys; first keys: {list(sd)[:5]})"
        )
    hp = to_plain(raw.get("hyper_parameters") or {})
    if not isinstance(hp, dict):
        raise OfficialCheckpointError(f"{path}: hyper_parameters is a {type(hp).__name__}")
    extra = {k: to_plain(v) for k, v in raw.items() if k not in ("state_dict", "hyper_parameters")}
    return OfficialCheckpoint(state_dict=sd, hyper_parameters=hp, extra=extra)


# ------------------------------------------------------------------ the release's components
_FS = "first_stage.decoder.decoder."  # the tokenizer (official RepTokLatentRF2D)

# (part, key prefix, first name components kept after the prefix; None = any). The first
# matching rule wins, so longer prefixes come first. Keys keep the official names after the
# prefix, with `_orig_mod.` (torch.compile's wrapper) removed.
PARTS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("encoder", _FS + "encoder.dino.model.", None),  # fine-tuned DINOv2, fp32
    ("target", _FS + "encoder.dino.target_model.", None),  # frozen DINOv2 (cosine target)
    ("token_adapter", _FS + "encoder.dino.", None),  # temp_pos_embed, new_reg, backbone.*
    ("decoder", _FS + "backbone.", None),  # the HDiT-style transformer
    ("mapping", _FS, ("time_emb", "time_in_proj", "mapping")),  # time features + mapping net
    ("vae", _FS + "ae.ae.", None),  # diffusers AutoencoderKL names
    ("encoder_bf16", "first_stage.encoder.encoder.", None),  # bf16 copy used by their encode
    ("generator", "model.net.", None),  # MLP-Mixer, raw weights
    ("generator_ema", "ema_model.net.", None),  # MLP-Mixer, EMA weights (sample with these)
)
SKIPPED_PREFIXES = ("metric_tracker.",)  # torchmetrics' FID Inception


@dataclass
class OfficialParts:
    parts: dict[str, dict[str, torch.Tensor]]  # part -> {official name after prefix: tensor}
    skipped: list[str]  # full keys deliberately ignored (metric_tracker.*)
    unknown: list[str]  # full keys no rule claims


def official_parts(state_dict: dict[str, torch.Tensor]) -> OfficialParts:
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _, _ in PARTS}
    skipped, unknown = [], []
    for key, value in state_dict.items():
        if key.startswith(SKIPPED_PREFIXES):
            skipped.append(key)
            continue
        for name, prefix, heads in PARTS:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :].replace("_orig_mod.", "")
            if heads is None or rest.split(".", 1)[0] in heads:
                parts[name][rest] = value
                break
        else:
            unknown.append(key)
    return OfficialParts(parts=parts, skipped=skipped, unknown=unknown)
