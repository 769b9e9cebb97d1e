import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reptok_core.config import preset_section
from reptok_core.models.encoder import (
    EncoderConfig,
    Preprocess,
    SSLEncoder,
    build_vit,
    cosine_loss,
)


def encoder_tiny() -> EncoderConfig:
    """The tiny preset's ViT (random init, 16 px, width 32)."""
    return preset_section(EncoderConfig, "tokenizer/tiny", "model.encoder")


def tiny_encoder(**kw) -> SSLEncoder:
    torch.manual_seed(0)
    return SSLEncoder(EncoderConfig(**{**encoder_tiny().__dict__, **kw}))


def test_only_cls_embedding_is_trainable_and_target_is_frozen():
    enc = tiny_encoder()
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable == ["vit.cls_token"]
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=1.0)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    loss = cosine_loss(enc(images), torch.randn(4, enc.dim), 1.0)
    loss.backward()
    opt.step()
    changed = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"vit.cls_token"}
    assert all(p.grad is None for n, p in enc.named_parameters() if n.startswith("frozen."))


def test_target_is_the_initial_encoder():
    enc = tiny_encoder()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(enc(images), enc.target(images))
    with torch.no_grad():
        enc.vit.cls_token.add_(1.0)
    assert not torch.allclose(enc(images), enc.target(images))


def test_finetune_ablations():
    assert [n for n, p in tiny_encoder(finetune="none").named_parameters() if p.requires_grad] == []
    full = tiny_encoder(finetune="full")
    assert all(p.requires_grad for n, p in full.named_parameters() if n.startswith("vit."))
    last = {n for n, p in tiny_encoder(finetune="last:1").named_parameters() if p.requires_grad}
    assert "vit.cls_token" in last and any(n.startswith("vit.blocks.1.") for n in last)
    assert not any(n.startswith("vit.blocks.0.") for n in last)


def test_cosine_loss_matches_hand_computation():
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    zf = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    # cos = [0, 1]  ->  λ * mean(1 - cos) = 0.1 * (1 + 0) / 2
    assert torch.isclose(cosine_loss(z, zf, 0.1), torch.tensor(0.05))


def test_token_projection_is_padding_at_init():
    from reptok_core.models.decoder import TokenProjection

    proj = TokenProjection(4, 6)
    z = torch.randn(3, 4)
    assert torch.allclose(proj(z), F.pad(z, (0, 2)))


def test_preprocess_crops_resizes_and_normalises():
    pre = Preprocess(8)
    x = torch.zeros(1, 3, 10, 16)  # mid-grey in [-1, 1]
    out = pre(x)
    assert out.shape == (1, 3, 8, 8)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)


def _official_forward(
    sd: dict, images: torch.Tensor, heads: int, depth: int, patch: int
) -> torch.Tensor:
    """DINOv2's own forward written out from its published math, reading its own key names."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    x = torch.cat([x[:, :1], sd["register_tokens"].expand(x.shape[0], -1, -1), x[:, 1:]], 1)
    b, n, d = x.shape
    for i in range(depth):
        p = lambda k, i=i: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        q, k, v = (
            F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias"))
            .view(b, n, 3, heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + p("ls1.gamma") * F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
            p("mlp.fc2.weight"),
            p("mlp.fc2.bias"),
        )
        x = x + p("ls2.gamma") * h
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 0]


def _official_state_dict(cfg: EncoderConfig) -> dict:
    g = torch.Generator().manual_seed(7)
    ref = build_vit(cfg).state_dict()
    sd = {
        k.replace("reg_token", "register_tokens"): torch.randn(v.shape, generator=g) * 0.2
        for k, v in ref.items()
    }
    sd = {k: v for k, v in sd.items() if not k.startswith("head")}
    d = ref["cls_token"].shape[-1]
    sd["pos_embed"] = torch.randn(1, 1 + ref["pos_embed"].shape[1], d, generator=g) * 0.2
    sd["mask_token"] = torch.zeros(1, d)
    return sd


def test_official_dinov2_layout_loads_with_identical_outputs(tmp_path):
    cfg = encoder_tiny()
    sd = _official_state_dict(cfg)
    path = tmp_path / "dinov2_official.safetensors"
    save_file(sd, str(path))
    enc = SSLEncoder(EncoderConfig(**{**cfg.__dict__, "weights": str(path)}))
    images = torch.rand(3, 3, 16, 16)
    ours = enc.vit.forward_features(images)[:, 0]
    theirs = _official_forward(sd, images, heads=2, depth=2, patch=4)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_timm_layout_and_torch_file_load(tmp_path):
    cfg = encoder_tiny()
    src = build_vit(cfg)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pt")
    enc = SSLEncoder(EncoderConfig(**{**cfg.__dict__, "weights": str(tmp_path / "w.pt")}))
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(enc.vit.forward_features(x), src.forward_features(x))


def test_bad_weights_file_gets_a_clear_error(tmp_path):
    bad = tmp_path / "not_weights.pt"
    bad.write_bytes(b"garbage")
    cfg = EncoderConfig(**{**encoder_tiny().__dict__, "weights": str(bad)})
    try:
        SSLEncoder(cfg)
    except ValueError as e:
        assert "not_weights.pt" in str(e)
    else:
        raise AssertionError("loading garbage weights must fail")


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    cfg = EncoderConfig(**{**encoder_tiny().__dict__, "weights": str(path)})
    try:
        SSLEncoder(cfg)
    except ValueError as e:
        assert "weights-only" in str(e)
    else:
        raise AssertionError("a pickled object must not load")
