import math

import pytest
import torch
import torch.nn.functional as F

from ivfast.models.predictor import Predictor, apply_rope, rope_tables


def small(depth=2, first_layer_id=23, window=8, in_dim=24):
    torch.manual_seed(0)
    return Predictor(in_dim, width=32, depth=depth, heads=4, mlp_hidden=48, window=window,
                     first_layer_id=first_layer_id)


def test_shapes_and_names():
    p = small()
    y = p(torch.randn(2, 20, 24))
    assert y.shape == (2, 20, 32)
    names = set(dict(p.named_parameters()))
    for n in ["layers.0.attn_norm.weight", "layers.0.attn.Wqkv.weight", "layers.0.attn.Wo.weight",
              "layers.0.mlp_norm.weight", "layers.0.mlp.Wi.weight", "layers.0.mlp.Wo.weight"]:
        assert n in names
    assert not any(n.startswith("layers.") and n.endswith(".bias") for n in names)  # bias-free layers
    assert p.layers[0].mlp.Wi.weight.shape == (96, 32)


def test_global_layer_ids():
    p = Predictor(16, width=32, depth=5, heads=4, mlp_hidden=48, first_layer_id=23)
    assert p.layer_ids == [23, 24, 25, 26, 27]
    assert p.global_layers == [1, 4]
    assert [layer.rope_theta for layer in p.layers] == [10000.0, 160000.0, 10000.0, 10000.0, 160000.0]
    assert [layer.attn.window for layer in p.layers] == [64, None, 64, 64, None]


@pytest.mark.parametrize("first_layer_id,is_global", [(23, False), (24, True)])
def test_locality(first_layer_id, is_global):
    p = small(depth=1, first_layer_id=first_layer_id, window=8)  # half-width 4
    assert p.layers[0].is_global == is_global
    n, i = 32, 15
    x = torch.randn(1, n, 24)
    far = [j for j in range(n) if abs(i - j) > 4]
    x2 = x.clone()
    x2[0, far] += torch.randn(len(far), 24)
    with torch.no_grad():
        y, y2 = p(x), p(x2)
    if is_global:
        assert (y[0, i] - y2[0, i]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(y[0, i], y2[0, i])
        # a token just inside the window does change position i
        x3 = x.clone()
        x3[0, i + 4] += torch.randn(24)
        with torch.no_grad():
            assert (p(x3)[0, i] - y[0, i]).abs().max() > 1e-4


def test_rope_depends_on_relative_position_only():
    cos, sin = rope_tables(40, 16, 10000.0, "cpu")
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rope(q.expand(1, 1, 40, 16), cos, sin)[0, 0, m]
        kn = apply_rope(k.expand(1, 1, 40, 16), cos, sin)[0, 0, n]
        return (qm * kn).sum()

    torch.testing.assert_close(score(10, 3), score(30, 23), atol=1e-4, rtol=1e-4)
    assert (score(10, 3) - score(10, 5)).abs() > 1e-4
    # rotate-half convention: position 1 rotates pair (c, c + 8) by inv_freq[c]
    x = torch.zeros(1, 1, 40, 16)
    x[..., 0] = 1.0
    r = apply_rope(x, cos, sin)[0, 0, 1]
    torch.testing.assert_close(r[[0, 8]], torch.tensor([math.cos(1.0), math.sin(1.0)]))


def reference_layer(layer, x, theta, window):
    """Explicit ModernBERT layer: pre-norm, RoPE, masked softmax attention, GeGLU."""
    b, n, d = x.shape
    hds = layer.attn.heads
    dh = d // hds
    h = F.layer_norm(x, (d,), layer.attn_norm.weight, None, layer.attn_norm.eps)
    q, k, v = (h @ layer.attn.Wqkv.weight.T).view(b, n, 3, hds, dh).permute(2, 0, 3, 1, 4)
    pos = torch.arange(n, dtype=torch.float32)
    inv = theta ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = pos[:, None] * inv[None]
    c, s = ang.cos(), ang.sin()

    def rot(t):
        t1, t2 = t[..., : dh // 2], t[..., dh // 2:]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1)

    q, k = rot(q), rot(k)
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if window is not None:
        far = (pos[:, None] - pos[None]).abs() > window
        logits = logits.masked_fill(far, float("-inf"))
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ layer.attn.Wo.weight.T
    h = F.layer_norm(x, (d,), layer.mlp_norm.weight, None, layer.mlp_norm.eps)
    a, g = (h @ layer.mlp.Wi.weight.T).chunk(2, dim=-1)
    return x + (F.gelu(a) * g) @ layer.mlp.Wo.weight.T


def test_matches_explicit_reference():
    p = small(depth=2, first_layer_id=23, window=8)  # layer 23 local, 24 global
    with torch.no_grad():
        for layer in p.layers:  # non-trivial norm weights
            layer.attn_norm.weight.normal_(1.0, 0.2)
            layer.mlp_norm.weight.normal_(1.0, 0.2)
    x = torch.randn(2, 24, 24)
    with torch.no_grad():
        h = p.in_proj(x)
        ref = reference_layer(p.layers[0], h, 10000.0, 4)
        ref = reference_layer(p.layers[1], ref, 160000.0, None)
        torch.testing.assert_close(p(x), ref, atol=1e-5, rtol=1e-4)
        # in_proj: Linear -> GELU -> Linear -> LayerNorm
        ip = p.in_proj
        ref_in = F.layer_norm(F.linear(F.gelu(F.linear(x, ip.fc1.weight, ip.fc1.bias)), ip.fc2.weight, ip.fc2.bias),
                              (32,), ip.norm.weight, ip.norm.bias, 1e-5)
        torch.testing.assert_close(h, ref_in)


def test_release_parameter_count_on_meta():
    with torch.device("meta"):
        p = Predictor(768)
    w, hid, depth, d_in = 1024, 2624, 5, 768
    per_layer = 2 * w + 3 * w * w + w * w + w * 2 * hid + hid * w
    layers = depth * per_layer
    in_proj = d_in * d_in + d_in + d_in * w + w + 2 * w
    assert layers == 61_286_400  # "about 61 M"
    assert sum(q.numel() for q in p.layers.parameters()) == layers
    assert sum(q.numel() for q in p.parameters()) == layers + in_proj
    assert p.global_layers == [1, 4]


def test_init():
    p = small(depth=1)
    w = p.layers[0].attn.Wqkv.weight
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.equal(p.in_proj.fc1.bias, torch.zeros_like(p.in_proj.fc1.bias))
    bound = math.sqrt(6 / (24 + 24))
    assert p.in_proj.fc1.weight.abs().max() <= bound


def test_gradients_reach_every_parameter():
    p = small(depth=3, first_layer_id=23, window=8)
    x = torch.randn(2, 16, 24, requires_grad=True)
    y = p(x)
    (y * torch.randn_like(y)).sum().backward()
    for name, q in p.named_parameters():
        assert q.grad is not None, name
        assert q.grad.abs().sum() > 0, name
    assert x.grad is not None
