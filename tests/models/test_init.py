"""model.init: the release's initialisation applied from outside the modules (ivfast.models.init)."""
import math

import pytest
import torch

from ivfast.config import load_config, stage1_config, stage2_config
from ivfast.models.init import apply_init, block_output_divisor
from ivfast.models.stage1 import Stage1Model
from ivfast.models.stage2 import Stage2Model


def stage1(seed=0, *overrides, scheme=None):
    torch.manual_seed(seed)
    model = Stage1Model(stage1_config(load_config("tiny", list(overrides))))
    if scheme:
        apply_init(model, scheme)
    return model


def stage2(seed=0, scheme=None):
    torch.manual_seed(seed)
    model = Stage2Model(stage2_config(load_config("stage2_tiny", ["model.stage2.init_checkpoint=x"])))
    if scheme:
        apply_init(model, scheme)
    return model


def head_weights(model):
    """The Linear weights of the heads the release draws trunc-normal(0.02)."""
    heads = [*model.align_heads, model.final_head, model.predictor.in_proj] if isinstance(model, Stage1Model) \
        else [model.head, model.predictor.in_proj]
    ws = [h.fc1.weight for h in heads] + [h.fc2.weight for h in heads]
    if isinstance(model, Stage1Model):
        ws += [model.pool.q.weight, model.pool.k.weight, model.pool.v.weight, model.pool.proj.weight]
    return ws


def test_block_outputs_are_the_same_draws_divided_by_sqrt_2_layer():
    before, after = stage1(3), stage1(3, scheme="release")  # same RNG: the encoder is built identically
    assert len(after.encoder.blocks) == 4
    for i, (b, a) in enumerate(zip(before.encoder.blocks, after.encoder.blocks)):
        d = math.sqrt(2 * (i + 1))
        assert block_output_divisor(i) == d
        for name in ("attn.proj.weight", "mlp.fc2.weight"):
            wb, wa = b.get_parameter(name), a.get_parameter(name)
            assert torch.equal(wa, wb / d), (i, name)
            # the unscaled law is trunc-normal(0.02): the rescaled std is 0.02 / sqrt(2 * layer)
            assert wa.std().item() == pytest.approx(0.02 / d, rel=0.08), (i, name)
        for name in ("attn.qkv.weight", "mlp.fc1.weight"):
            assert torch.equal(a.get_parameter(name), b.get_parameter(name))


def test_release_heads_are_trunc_normal_002_with_absolute_bounds():
    model = stage1(0, scheme="release")
    for w in head_weights(model):
        assert abs(w.mean().item()) < 0.003 and w.std().item() == pytest.approx(0.02, rel=0.1)
        # torch's (and timm's) trunc_normal_ bounds are absolute [-2, 2]: at std 0.02 nothing is cut,
        # so values beyond 2 std occur (about 4.6 % of them)
        assert (w.abs() > 0.04).float().mean().item() == pytest.approx(0.0455, abs=0.02)
    for h in (*model.align_heads, model.final_head, model.predictor.in_proj):
        for fc in (h.fc1, h.fc2):
            assert torch.all(fc.bias == 0)
        assert torch.all(h.norm.weight == 1) and torch.all(h.norm.bias == 0)
    assert torch.all(model.pool.proj.bias == 0)
    assert all(torch.all(b == 0) for b in (model.pool.q_bias, model.pool.k_bias, model.pool.v_bias))


def test_release_predictor_layers_follow_modernbert_and_the_patch_projection_pytorch_default():
    model = stage1(0, scheme="release")
    layers = model.predictor.layers  # tiny: first_layer_id 1, depth 3: a 4-layer source model
    out_std = 0.02 / math.sqrt(2 * 4)
    for layer in layers:
        for w, std in ((layer.attn.Wqkv.weight, 0.02), (layer.mlp.Wi.weight, 0.02),
                       (layer.attn.Wo.weight, out_std), (layer.mlp.Wo.weight, out_std)):
            assert w.abs().max().item() <= 2 * std  # ModernBERT truncates at +-2 std
            # the std of a normal truncated at +-2 std is 0.880 of its scale
            assert w.std().item() == pytest.approx(0.880 * std, rel=0.1)
    proj = model.encoder.patch_embed.proj  # the release's Conv3d: PyTorch's default, fan-in 588
    bound = 1 / math.sqrt(proj.in_features)
    assert proj.in_features == 588
    assert proj.weight.abs().max().item() <= bound and proj.weight.std().item() == pytest.approx(bound / math.sqrt(3),
                                                                                                 rel=0.05)
    assert proj.bias.abs().max().item() <= bound and proj.bias.abs().max().item() > 0


def test_xavier_is_the_modules_own_init_bit_for_bit_and_release_leaves_the_rest():
    fresh, xavier, release = stage1(5), stage1(5, scheme="xavier"), stage1(5, scheme="release")
    for k, v in fresh.state_dict().items():
        assert torch.equal(xavier.state_dict()[k], v), k
    for w in head_weights(xavier):  # xavier-uniform: U(+-sqrt(6 / (fan_in + fan_out)))
        bound = math.sqrt(6 / sum(w.shape))
        assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    changed = {n for n, p in release.named_parameters() if not torch.equal(p, fresh.get_parameter(n))}
    assert not any(n.startswith(("diffloss.", "align_pos.", "predictor_pos.", "encoder.pos.")) for n in changed)
    assert "mask_token" not in changed and "encoder.cls_token" not in changed
    assert "encoder.blocks.0.attn.qkv.weight" not in changed and "encoder.blocks.3.mlp.fc2.weight" in changed


def test_names_shapes_unchanged_and_a_scheme_applies_once():
    for build in (stage1, stage2):
        ref = build(0)
        model = build(0, scheme="release")
        assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == \
            [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
        assert list(model.state_dict()) == list(ref.state_dict())
        with pytest.raises(RuntimeError, match="already applied"):
            apply_init(model, "xavier")
    with pytest.raises(ValueError, match="release"):
        apply_init(stage1(0), "kaiming")
    with pytest.raises(TypeError):
        apply_init(torch.nn.Linear(2, 2), "release")


def test_linear_recon_head_is_xavier_under_release():
    model = stage1(0, "model.recon=linear", scheme="release")
    w = model.recon_head.weight
    bound = math.sqrt(6 / sum(w.shape))
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.all(model.recon_head.bias == 0)
    assert not hasattr(stage1(0, "model.recon=none", scheme="release"), "predictor")


def test_stage2_release_head_and_teacher_copy():
    before, model = stage2(2), stage2(2, scheme="release")
    for w in (model.head.fc1.weight, model.head.fc2.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.head.fc1.bias == 0)
    for i, blk in enumerate(model.encoder.blocks):
        assert torch.equal(blk.attn.proj.weight, before.encoder.blocks[i].attn.proj.weight / math.sqrt(2 * (i + 1)))
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k
    assert not any(p.requires_grad for p in model.teacher.parameters())
