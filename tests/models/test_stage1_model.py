"""The Stage-1 model: parameter counts, names and shapes of the paper's configs (on the meta
device), and one forward/backward of the tiny one through the trainer's step."""
import json
import os

import pytest
import torch

from ivfast.config import load_config, stage1_config, stage2_config
from ivfast.masks import num_visible_per_frame
from ivfast.models.encoder import patchify
from ivfast.models.stage1 import Stage1Model, student_return_layers
from ivfast.models.stage2 import Stage2Model
from ivfast.rng import SampleRNG
from ivfast.training.step import Stage1Step, build_teacher, draw_mask, run_teacher, visible_teacher_layers
from tests.support import no_host_reads, stage1_model



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
    cfg = load_config(name)
    with torch.device("meta"):
        model = stage1_model(cfg)
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
    cfg = load_config("stage1_b_diffusion")
    with torch.device("meta"):
        model = stage1_model(cfg)
        teacher = build_teacher(cfg)
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
    tokens = patchify(video, 14, 1)
    frames = video.permute(0, 2, 1, 3, 4).reshape(8, 3, 28, 42)
    ref = torch.nn.functional.pixel_unshuffle(frames, 14).permute(0, 2, 3, 1).reshape(2, 4 * 2 * 3, 588)
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("name", ["tiny", "stage1_b_diffusion", "stage2_tiny", "stage2_b"])
def test_parameter_names_and_shapes_are_pinned(name):
    """Old checkpoints load: the names, order and shapes of the parameters and of the state dict
    are those recorded (from the models as they were before the restructuring)."""
    with open(os.path.join(os.path.dirname(__file__), "parameter_names.json")) as f:
        pinned = json.load(f)[name]
    stage2 = name.startswith("stage2")
    cfg = load_config(name, ["model.stage2.init_checkpoint=x"] if stage2 else [])
    with torch.device("meta"):
        model = Stage2Model(stage2_config(cfg)) if stage2 else Stage1Model(stage1_config(cfg))
    assert [[n, list(p.shape)] for n, p in model.named_parameters()] == pinned["parameters"]
    assert [[n, list(t.shape)] for n, t in model.state_dict().items()] == pinned["state_dict"]


def _tiny_step(recon="diffusion", extra=()):
    cfg = load_config("tiny", [f"model.recon={recon}", *extra])
    torch.manual_seed(0)
    return cfg, Stage1Step(cfg)


@pytest.mark.parametrize("recon", ["none", "linear", "diffusion"])
def test_tiny_forward_backward_every_variant(recon):
    cfg, step = _tiny_step(recon)
    video = torch.randn(2, 3, 4, 56, 56)
    inputs = step.prepare(video, SampleRNG.for_step(0, 0, [5, 6]))
    assert inputs.visible_idx.shape == (2, 4 * num_visible_per_frame(16, 0.75))
    if recon == "none":
        assert inputs.recon_idx is None and inputs.diffusion_t is None
    else:
        assert inputs.recon_idx.shape == (2, 4 * 16 - inputs.visible_idx.shape[1])
    if recon == "diffusion":
        assert inputs.diffusion_t.shape == inputs.diffusion_seeds.shape == (inputs.recon_idx.numel(),)
    out = step.model(*inputs)
    expected = {"loss", "loss_align_layers", "loss_align_final"} | ({"loss_recon"} if recon != "none" else set())
    assert expected <= set(out) and set(step.model.loss_names) == set(out)
    w = cfg.model.loss_weights
    total = w[0] * out["loss_align_layers"] + w[1] * out["loss_align_final"] + w[2] * out.get("loss_recon", 0.0)
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    assert all(p.grad is not None for p in step.model.parameters())
    assert all(p.grad is None for p in step.teacher.parameters())


def test_the_forward_never_waits_on_the_host(monkeypatch):
    """Everything random or host-side happens in prepare: the model's forward reads no tensor
    back (no .item(), .tolist(), .cpu(), int()/float()/bool() of a tensor)."""
    for recon in ("linear", "diffusion"):
        _, step = _tiny_step(recon, ["model.diffusion.reconstruction_ratio=0.5"])
        inputs = step.prepare(torch.randn(2, 3, 4, 56, 56), SampleRNG.for_step(0, 0, [5, 6]))

        with no_host_reads(monkeypatch):
            out = step.model(*inputs)
        out["loss"].backward()


def test_batch_mul_repeats_each_sample_rows():
    """batch_mul: every sample's rows are repeated, sample-major (b, repeat, token), each repeat
    with its own timestep and noise."""
    _, step = _tiny_step("diffusion", ["model.diffusion.batch_mul=3"])
    inputs = step.prepare(torch.randn(2, 3, 4, 56, 56), SampleRNG.for_step(0, 0, [5, 6]))
    n = inputs.recon_idx.shape[1]
    assert inputs.diffusion_t.shape == (2 * 3 * n,) and inputs.diffusion_seeds.unique().numel() == 2 * 3 * n
    seen = {}
    head = step.model.diffloss
    orig = head.forward

    def spy(z, target, t, seeds):
        seen.update(z=z, target=target)
        return orig(z, target, t, seeds)

    head.forward = spy
    step.model(*inputs)
    z, target = seen["z"].reshape(2, 3, n, -1), seen["target"].reshape(2, 3, n, -1)
    for r in range(1, 3):
        assert torch.equal(z[:, r], z[:, 0]) and torch.equal(target[:, r], target[:, 0])


@pytest.mark.kernels
def test_kernels_and_references_give_the_same_step():
    """model.fused_kernels on (Triton, through the interpreter here) or off: the same losses and
    gradients within float32 rounding."""
    from ivfast.ops import dispatch

    runs = []
    for fused in (True, False):
        _, step = _tiny_step("diffusion", ["model.encoder.drop_path=0.0"])
        inputs = step.prepare(torch.randn(2, 3, 4, 56, 56), SampleRNG.for_step(0, 0, [5, 6]))
        with dispatch.override(fused=fused):
            out = step.model(*inputs)
            out["loss"].backward()
        runs.append((out, {n: p.grad for n, p in step.model.named_parameters()}))
    (a, ga), (b, gb) = runs
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-5, msg=n)


def test_teacher_and_predictor_weights_load_from_config(tmp_path):
    """model.teacher.weights / model.predictor.init_weights take local safetensors into the built step."""
    from safetensors.torch import save_file

    cfg = load_config("tiny")
    torch.manual_seed(123)
    donor_teacher = build_teacher(cfg)
    donor_pred = stage1_model(cfg).predictor
    t_path, p_path = str(tmp_path / "siglip.safetensors"), str(tmp_path / "modernbert.safetensors")
    save_file({f"vision_model.{k}": v.contiguous() for k, v in donor_teacher.state_dict().items()}, t_path)
    first = cfg.model.predictor.first_layer_id
    save_file({f"model.layers.{first + i}.{k.split('.', 2)[2]}": v.contiguous()
               for k, v in donor_pred.layers.state_dict(prefix="layers.").items()
               for i in [int(k.split(".")[1])]}, p_path)
    cfg = load_config("tiny", [f"model.teacher.weights={t_path}", f"model.predictor.init_weights={p_path}",
                          "model.teacher.init_seed=7"])
    step = Stage1Step(cfg)
    for k, v in donor_teacher.state_dict().items():
        assert torch.equal(step.teacher.state_dict()[k], v), k
    for k, v in donor_pred.layers.state_dict().items():
        assert torch.equal(step.model.predictor.layers.state_dict()[k], v), k


def test_visible_teacher_layers_give_the_same_alignment_loss():
    """The step gathers the visible teacher tokens before the student runs: the gathered tensor
    equals the per-layer gather of the full layers, the losses are identical, and prepare is
    these calls."""
    from ivfast.models.heads import cosine_align_loss
    from ivfast.ops.token_gather import gather_tokens

    cfg = load_config("tiny", ["model.recon=none", "model.encoder.drop_path=0.0"])
    torch.manual_seed(3)
    step = Stage1Step(cfg)
    model, teacher = step.model, step.teacher
    video = torch.randn(3, 3, 4, 56, 56)
    tout = run_teacher(teacher, video, 64)
    mask = draw_mask(cfg, SampleRNG.for_step(0, 0, [1, 2, 3]), model.encoder.grid, tout.saliency)
    k, _, _, w = tout.layers.shape
    full = tout.layers.reshape(k, 3, -1, w)
    got = visible_teacher_layers(tout.layers, mask.visible_idx)
    assert got.shape == (k, 3, mask.visible_idx.shape[1], w)
    for i in range(k):
        assert torch.equal(got[i], gather_tokens(full[i], mask.visible_idx))
    enc = model.encoder(video, mask.visible_idx)
    loss_layers, _ = model.align_losses(enc, mask.visible_idx, got, tout.pooled)
    pos = model.align_pos()[mask.visible_idx]
    ref = torch.stack([cosine_align_loss(h(enc.layers[i][:, enc.num_cls:] + pos),
                                         gather_tokens(full[i], mask.visible_idx))
                       for i, h in enumerate(model.align_heads)]).mean()
    assert torch.equal(loss_layers, ref)
    with pytest.raises(ValueError, match="teacher_layers"):
        model.align_losses(enc, mask.visible_idx, tout.layers, tout.pooled)
    inputs = step.prepare(video, SampleRNG.for_step(0, 0, [1, 2, 3]))
    assert torch.equal(inputs.visible_idx, mask.visible_idx)
    assert torch.equal(inputs.teacher_layers, got) and torch.equal(inputs.teacher_pooled, tout.pooled)
