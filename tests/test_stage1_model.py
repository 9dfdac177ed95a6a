"""The Stage-1 model of the paper's configs, built on the meta device: parameter counts and shapes."""
import os

import pytest
import torch

from ivfast.config import load_config
from ivfast.models.masking import num_visible_per_frame
from ivfast.models.stage1 import build_stage1, build_teacher, patchify, student_return_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_of(name):
    return load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))


def linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def encoder_params(w, depth, n_patches, n_cls=4, patch_dim=588, mlp=4):
    """Release block: RMSNorm pre-norm, qkv without bias, QK-norm, LayerScale; dual-norm patch embed."""
    embed = patch_dim + linear(patch_dim, w) + w
    tokens = n_cls * w + (n_cls + n_patches) * w
    block = (w + linear(w, 3 * w, bias=False) + 2 * w + linear(w, w) + w  # norm1, qkv, q/k norm, proj, ls1
             + w + linear(w, mlp * w) + linear(mlp * w, w) + w)  # norm2, mlp, ls2
    return embed + tokens + depth * block


def mlp_head(i, o, hidden=None):
    hidden = hidden or i
    return linear(i, hidden) + linear(hidden, o) + 2 * o


def align_params(w, k, teacher_w, n_patches, pool_dim=768):
    pool = 3 * 2 * w + 3 * w * w + 3 * w + linear(w, pool_dim)
    return k * mlp_head(w, teacher_w) + n_patches * w + pool + mlp_head(pool_dim, teacher_w)


def predictor_params(in_dim, n_patches, n_cls=4, w=1024, depth=5, inter=2624):
    in_proj = linear(in_dim, in_dim) + linear(in_dim, w) + 2 * w
    layer = w + 3 * w * w + w * w + w + w * 2 * inter + inter * w  # bias-free norms and linears
    return in_proj + depth * layer + in_dim + (n_cls + n_patches) * in_dim  # + mask token + position table


def diffusion_params(c=588, z=1024, w=1536, depth=6, learn_sigma=True):
    out = 2 * c if learn_sigma else c
    stem = linear(c, w) + linear(256, w) + linear(w, w) + linear(z, w)
    block = 2 * w + 2 * linear(w, w) + linear(w, 3 * w)
    final = linear(w, out) + linear(w, 2 * w)
    return stem + depth * block + final


@pytest.mark.parametrize("name,width,depth", [
    ("stage1_b_align", 768, 12), ("stage1_b_linear", 768, 12),
    ("stage1_b_diffusion", 768, 12), ("stage1_l_diffusion", 1024, 24),
])
def test_parameter_counts_on_meta(name, width, depth):
    cfg = cfg_of(name)
    with torch.device("meta"):
        model = build_stage1(cfg)
    n = 16 * 16 * 16
    expected = encoder_params(width, depth, n) + align_params(width, 6, 1536, n)
    if cfg.model.recon != "none":
        expected += predictor_params(width, n)
    if cfg.model.recon == "linear":
        expected += linear(1024, 588)
    if cfg.model.recon == "diffusion":
        expected += diffusion_params()
    assert sum(p.numel() for p in model.parameters()) == expected
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    assert parts["encoder"] == encoder_params(width, depth, n)
    if cfg.model.recon != "none":
        layers = sum(p.numel() for p in model.predictor.layers.parameters())
        assert layers == 61_286_400  # the last 5 layers of ModernBERT-large: "about 61 M"
    print(name, {k: f"{v / 1e6:.2f}M" for k, v in parts.items()})


def test_shapes_of_the_b_config():
    cfg = cfg_of("stage1_b_diffusion")
    with torch.device("meta"):
        model = build_stage1(cfg)
        teacher = build_teacher(cfg.model, cfg.data.num_frames)
    assert model.encoder.grid == (16, 16, 16) and model.encoder.num_patches == 4096
    assert model.target_dim == 588
    assert list(model.encoder.return_layers) == student_return_layers(12, 6) == [6, 7, 8, 9, 10, 11]
    assert list(teacher.return_layers) == [23, 26, 30, 33, 36, 39]
    assert model.predictor.global_layers == [1, 4]
    assert num_visible_per_frame(256, 0.8) == 52  # 832 visible tokens of 4096 per clip
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert 1.1e9 < n_teacher < 1.2e9  # SigLIP2 giant-opt vision tower
    assert not any(p.requires_grad for p in teacher.parameters())


def test_patchify_matches_pixel_unshuffle():
    video = torch.randn(2, 3, 4, 28, 42)
    tokens = patchify(video, 14)
    frames = video.permute(0, 2, 1, 3, 4).reshape(8, 3, 28, 42)
    ref = torch.nn.functional.pixel_unshuffle(frames, 14).permute(0, 2, 3, 1).reshape(2, 4 * 2 * 3, 588)
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("recon", ["none", "linear", "diffusion"])
def test_tiny_forward_backward_every_variant(recon):
    from ivfast.models.sample_rng import SampleRNG
    from ivfast.models.stage1 import teacher_step

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [f"model.recon={recon}"])
    torch.manual_seed(0)
    model, teacher = build_stage1(cfg), build_teacher(cfg.model, 4)
    video = torch.randn(2, 3, 4, 56, 56)
    rng = SampleRNG.for_step(0, 0, [5, 6])
    mask, targets, pooled = teacher_step(teacher, cfg.model, model.encoder.grid, video, rng)
    assert mask.visible_idx.shape == (2, 4 * num_visible_per_frame(16, 0.75))
    out = model(video, mask.visible_idx, mask.masked_idx, targets, pooled, torch.tensor(rng.seeds))
    expected = {"loss", "loss_align_layers", "loss_align_final"} | ({"loss_recon"} if recon != "none" else set())
    assert expected <= set(out) and set(model.loss_names) == set(out)
    w = cfg.model.loss_weights
    total = w[0] * out["loss_align_layers"] + w[1] * out["loss_align_final"] + w[2] * out.get("loss_recon", 0.0)
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_and_predictor_weights_load_from_config(tmp_path):
    """model.teacher.weights / model.predictor.init_weights take local safetensors into the built model."""
    from safetensors.torch import save_file

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    torch.manual_seed(123)
    donor_teacher = build_teacher(cfg.model, 4)
    donor_pred = build_stage1(cfg).predictor
    t_path, p_path = str(tmp_path / "siglip.safetensors"), str(tmp_path / "modernbert.safetensors")
    save_file({f"vision_model.{k}": v.contiguous() for k, v in donor_teacher.state_dict().items()}, t_path)
    first = cfg.model.predictor.first_layer_id
    save_file({f"model.layers.{first + i}.{k.split('.', 2)[2]}": v.contiguous()
               for k, v in donor_pred.layers.state_dict(prefix="layers.").items()
               for i in [int(k.split(".")[1])]}, p_path)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      [f"model.teacher.weights={t_path}", f"model.predictor.init_weights={p_path}",
                       "model.teacher.init_seed=7"])
    teacher, model = build_teacher(cfg.model, 4), build_stage1(cfg)
    for k, v in donor_teacher.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    for k, v in donor_pred.layers.state_dict().items():
        assert torch.equal(model.predictor.layers.state_dict()[k], v), k


def test_visible_teacher_layers_give_the_same_alignment_loss():
    """The task gathers the visible teacher tokens before the student runs: the gathered
    tensor equals the per-layer gather of the full layers, and the losses are identical."""
    from ivfast.models import token_ops
    from ivfast.models.heads import cosine_align_loss
    from ivfast.models.sample_rng import SampleRNG
    from ivfast.models.stage1 import make_mask, run_teacher, teacher_step, visible_teacher_layers

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["model.recon=none", "model.encoder.drop_path=0.0"])
    torch.manual_seed(3)
    model, teacher = build_stage1(cfg), build_teacher(cfg.model, 4)
    video = torch.randn(3, 3, 4, 56, 56)
    tout = run_teacher(teacher, video, 64)
    mask = make_mask(cfg.model, SampleRNG.for_step(0, 0, [1, 2, 3]), model.encoder.grid, tout.saliency)
    k, _, _, w = tout.layers.shape
    full = tout.layers.reshape(k, 3, -1, w)
    got = visible_teacher_layers(tout.layers, mask.visible_idx)
    assert got.shape == (k, 3, mask.visible_idx.shape[1], w)
    for i in range(k):
        assert torch.equal(got[i], token_ops.gather_tokens(full[i], mask.visible_idx))
    enc = model.encoder(video, mask.visible_idx)
    loss_layers, _ = model.align_losses(enc, mask.visible_idx, got, tout.pooled)
    pos = model.align_pos()[mask.visible_idx]
    ref = torch.stack([cosine_align_loss(h(enc.layers[i][:, enc.num_cls:] + pos),
                                         token_ops.gather_tokens(full[i], mask.visible_idx))
                       for i, h in enumerate(model.align_heads)]).mean()
    assert torch.equal(loss_layers, ref)
    with pytest.raises(ValueError, match="visible_teacher_layers"):
        model.align_losses(enc, mask.visible_idx, tout.layers, tout.pooled)
    # teacher_step (what the trainer runs) is the same three calls
    mask2, targets2, pooled2 = teacher_step(teacher, cfg.model, model.encoder.grid, video,
                                            SampleRNG.for_step(0, 0, [1, 2, 3]))
    assert torch.equal(mask2.visible_idx, mask.visible_idx) and torch.equal(mask2.masked_idx, mask.masked_idx)
    assert torch.equal(targets2, got) and torch.equal(pooled2, tout.pooled)
