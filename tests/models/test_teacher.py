import math

import pytest
import torch
import torch.nn.functional as F

from ivfast.models.teacher import SigLIPTeacher, TeacherOutput, prepare_teacher_input, teacher_return_layers

W, DEPTH, HEADS, IMG, PATCH, MLP = 64, 4, 4, 32, 8, 128
L = (IMG // PATCH) ** 2


def tiny(return_layers=(1, 3)):
    torch.manual_seed(0)
    return SigLIPTeacher(img_size=IMG, patch_size=PATCH, width=W, depth=DEPTH, heads=HEADS, mlp_dim=MLP,
                         return_layers=return_layers).freeze()


def test_return_layers_release():
    assert teacher_return_layers(40, 6, 3.33) == [23, 26, 30, 33, 36, 39]
    assert teacher_return_layers(4, 2, 1) == [2, 3]


def test_parameter_names_follow_siglip_layout():
    names = set(dict(tiny().named_parameters()))
    expected = {
        "embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
        "embeddings.position_embedding.weight",
        "encoder.layers.0.layer_norm1.weight", "encoder.layers.0.layer_norm1.bias",
        "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.bias",
        "encoder.layers.0.self_attn.k_proj.weight", "encoder.layers.0.self_attn.v_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.layer_norm2.weight", "encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc2.bias",
        "post_layernorm.weight", "post_layernorm.bias",
        "head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias",
        "head.attention.out_proj.weight", "head.attention.out_proj.bias",
        "head.layernorm.weight", "head.mlp.fc1.weight", "head.mlp.fc2.bias",
    }
    assert expected <= names
    t = tiny()
    assert t.embeddings.position_embedding.weight.shape == (L, W)
    assert t.head.probe.shape == (1, 1, W)
    assert t.encoder.layers[0].layer_norm1.eps == 1e-6


def test_shapes_and_normalisation():
    t = tiny()
    x = torch.randn(6, 3, IMG, IMG)
    with torch.no_grad():
        out = t(x)
    assert isinstance(out, TeacherOutput)
    assert out.layers.shape == (2, 6, L, W)
    assert out.pooled.shape == (6, W)
    assert out.saliency.shape == (6, L)
    torch.testing.assert_close(out.layers.norm(dim=-1), torch.ones(2, 6, L))
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(6))
    assert (out.saliency >= 0).all()
    torch.testing.assert_close(out.saliency.sum(-1), torch.ones(6))


def test_layers_are_inputs_of_the_chosen_layers():
    t = tiny(return_layers=(3, 0, 2))  # unsorted on purpose
    assert t.return_layers == [0, 2, 3]
    captured = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0].clone()))
        for i, layer in enumerate(t.encoder.layers)
    ]
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        out = t(x)
    for h in hooks:
        h.remove()
    for k, i in enumerate([0, 2, 3]):
        torch.testing.assert_close(out.layers[k], F.normalize(captured[i], dim=-1))
    # neighbouring layers differ, so the check above is not vacuous
    assert not torch.allclose(F.normalize(captured[1], dim=-1), out.layers[1], atol=1e-3)


def test_saliency_and_pooled_match_explicit_and_torch_mha():
    t = tiny()
    x = torch.randn(4, 3, IMG, IMG)
    captured = {}
    hook = t.post_layernorm.register_forward_hook(lambda m, a, o: captured.__setitem__("tok", o.clone()))
    with torch.no_grad():
        out = t(x)
    hook.remove()
    tok = captured["tok"]  # (BT, L, W) post-layernorm tokens
    mha = t.head.attention
    dh = W // HEADS
    wq, wk, _ = mha.in_proj_weight.chunk(3)
    bq, bk, _ = mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        q = (t.head.probe[0] @ wq.T + bq).view(1, HEADS, dh).transpose(0, 1)  # (H, 1, dh)
        k = (tok @ wk.T + bk).view(4, L, HEADS, dh).transpose(1, 2)  # (B, H, L, dh)
        probs = torch.softmax(q.unsqueeze(0) @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (B, H, 1, L)
        expected = probs[:, :, 0].mean(1)
        torch.testing.assert_close(out.saliency, expected)
        # torch's own MultiheadAttention on the same parameters agrees, weights and output
        o, w = mha(t.head.probe.expand(4, -1, -1), tok, tok, need_weights=True, average_attn_weights=True)
        torch.testing.assert_close(out.saliency, w[:, 0], atol=1e-6, rtol=1e-5)
        o = o + t.head.mlp(t.head.layernorm(o))
        torch.testing.assert_close(out.pooled, F.normalize(o[:, 0], dim=-1), atol=1e-5, rtol=1e-5)


def test_saliency_is_not_uniform_for_a_trained_like_probe():
    t = tiny()
    with torch.no_grad():
        t.head.attention.in_proj_weight.mul_(100.0)  # large q, k: a peaked attention
        t.head.probe.mul_(10.0)
        out = t(torch.randn(2, 3, IMG, IMG))
    assert out.saliency.max() > 2.0 / L
    torch.testing.assert_close(out.saliency.sum(-1), torch.ones(2))


def test_frozen():
    t = tiny()
    assert not any(p.requires_grad for p in t.parameters())
    assert not t.training
    parent = torch.nn.Sequential(t, torch.nn.Linear(2, 2))
    parent.train()
    assert not t.training  # stays in eval inside a parent switched to train
    assert SigLIPTeacher(img_size=IMG, patch_size=PATCH, width=W, depth=1, heads=HEADS, mlp_dim=MLP).training


def test_wrong_resolution_raises():
    with pytest.raises(ValueError):
        tiny()(torch.randn(1, 3, IMG + PATCH, IMG + PATCH))


def test_prepare_constant_colour_round_trip():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = torch.tensor([0.2, 0.6, 0.9])
    b, t, h = 2, 3, 24
    raw = rgb.view(1, 3, 1, 1, 1).expand(b, 3, t, h, h)
    video = (raw - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)
    out = prepare_teacher_input(video, 32, mean, std)
    assert out.shape == (b * t, 3, 32, 32)
    expected = ((rgb - 0.5) / 0.5).view(1, 3, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # same size: no resize, values pass straight through the two normalisations
    out2 = prepare_teacher_input(video, h, mean, std)
    assert out2.shape == (b * t, 3, h, h)
    torch.testing.assert_close(out2, expected[:, :, :h, :h], atol=1e-6, rtol=1e-6)


def test_prepare_frame_order_and_resize():
    b, t, h, w = 2, 3, 20, 28
    video = torch.randn(b, 3, t, h, w)
    out = prepare_teacher_input(video, 16, mean=(0, 0, 0), std=(1, 1, 1), teacher_mean=(0, 0, 0), teacher_std=(1, 1, 1))
    assert out.shape == (b * t, 3, 16, 16)
    for bi in range(b):
        for ti in range(t):
            ref = F.interpolate(video[bi, :, ti][None], size=(16, 16), mode="bicubic", align_corners=False)[0]
            torch.testing.assert_close(out[bi * t + ti], ref)
