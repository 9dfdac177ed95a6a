"""The memory switches: per-module activation checkpointing, lean saves, diffusion-token
subsampling, the diffusion head's precision, the teacher's precision, the allocator settings.

Models are the tiny config's (fp32 unless a test says otherwise); tests marked ``kernels`` run
the fused kernels through Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""
import copy
import functools
import os

import pytest
import torch

from ivfast.config import ConfigError, load_config
from ivfast.models.diffloss import DiffusionLoss
from ivfast.ops import adaln, dispatch
from ivfast.rng import SampleRNG
from ivfast.training import activation_checkpoint as checkpointing
from ivfast.training.step import Stage1Step, reconstruction_subset, run_teacher
from tests.support import ROOT

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SEEDS = [11, 12]


def tiny(*overrides):
    return load_config(TINY, ["model.encoder.drop_path=0.5", *overrides])  # drop-path visibly on


def prepared(*overrides, video=None):
    """One micro-batch of the tiny config through the trainer's step: the model's inputs."""
    torch.manual_seed(0)
    step = Stage1Step(tiny(*overrides))
    video = torch.randn(2, 3, 4, 56, 56) if video is None else video
    return step.prepare(video, SampleRNG(SEEDS))


@pytest.fixture(scope="module")
def batch():
    return prepared()


def build_stage1(cfg):
    return Stage1Step(cfg).model


def twin_models(*overrides, base=()):
    """(reference, switched): the tiny Stage-1 model with ``base`` and with ``overrides``, same weights."""
    torch.manual_seed(1)
    ref = build_stage1(tiny(*base))
    new = build_stage1(tiny(*overrides))
    new.load_state_dict(ref.state_dict())
    with torch.no_grad():  # the zero-initialised adaLN / output layers would hide most gradients
        for m in (ref, new):
            g = torch.Generator().manual_seed(2)
            for p in m.diffloss.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ref.train(), new.train()


def saved_bytes(model, batch, monkeypatch, seed=3, scope=None):
    """Loss, gradients and the bytes kept for backward while ``scope`` (a submodule; default the
    model) runs its forward: the unique storages that autograd saves (``saved_tensors_hooks``)
    plus the inputs that each checkpoint keeps for its recomputation; parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}
    inside = [0 if scope is not None else 1]
    if scope is not None:
        hooks = [scope.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1)),
                 scope.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1))]

    def note(t):
        st = t.untyped_storage()
        if inside[0] and st.nbytes() and st.data_ptr() not in skip:
            kept[st.data_ptr()] = st.nbytes()

    def pack(t):
        note(t)
        return t

    real = checkpointing._checkpoint

    def keeping_inputs(fn, *args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                note(a)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "_checkpoint", keeping_inputs)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop-path draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*batch)
    nbytes = sum(kept.values())
    out["loss"].backward()
    monkeypatch.setattr(checkpointing, "_checkpoint", real)
    if scope is not None:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, nbytes


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("override,message", [
    ("model.checkpointing=[encoder, decoder]",
     "config error: model.checkpointing = ['encoder', 'decoder']: must be distinct names from "
     "['encoder', 'predictor', 'diffusion']"),
    ("model.diffusion.reconstruction_ratio=0",
     "config error: model.diffusion.reconstruction_ratio = 0.0: must be in (0, 1]"),
    ("model.diffusion.reconstruction_ratio=1.5",
     "config error: model.diffusion.reconstruction_ratio = 1.5: must be in (0, 1]"),
    ("model.diffusion.precision=bf16",
     "config error: model.diffusion.precision = 'bf16': must be one of 'auto' | 'fp32'"),
    ("model.teacher.precision=fp16",
     "config error: model.teacher.precision = 'fp16': must be one of 'auto' | 'bf16' | 'fp32'"),
    ("train.allocator=expandable_segments", "config error: train.allocator = 'expandable_segments': must be PyTorch"),
])
def test_bad_switch_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_old_lean_mlp_key_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="model.lean_mlp.*model.lean_saves"):
        assert load_config(TINY, ["model.lean_mlp=false"]).model.lean_saves is False
    with pytest.warns(FutureWarning):
        assert load_config(None, ["model.lean_mlp=true"]).model.lean_saves is True


def test_lowmem_config_checkpoints_all_three_modules_and_keeps_the_method():
    cfg = load_config(os.path.join(ROOT, "configs", "stage1_b_diffusion_lowmem.yaml"))
    base = load_config(os.path.join(ROOT, "configs", "stage1_b_diffusion.yaml"))
    assert sorted(cfg.model.checkpointing) == ["diffusion", "encoder", "predictor"]
    assert cfg.model.diffusion.reconstruction_ratio == 1.0 and cfg.model.mask_ratio == base.model.mask_ratio
    assert (cfg.data.batch_size, cfg.data.num_frames) == (16, 16)
    assert base.model.checkpointing == [] and base.train.allocator == ""


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.kernels
@pytest.mark.parametrize("module", ["encoder", "predictor", "diffusion"])
def test_checkpointing_keeps_loss_and_grads_and_saves_less(module, batch, monkeypatch):
    wide = ["model.diffusion.width=256", "model.diffusion.depth=4",  # blocks, not the 588-pixel ends, dominate
            "model.diffusion.chunk_rows=0"]  # chunked, the head keeps only gradients: nothing to checkpoint
    ref, ckpt = twin_models(*wide, f"model.checkpointing=[{module}]", base=wide)
    flags = {"encoder": ckpt.encoder.blocks[0], "predictor": ckpt.predictor.layers[0],
             "diffusion": ckpt.diffloss.net.res_blocks[0]}
    assert {k: checkpointing.is_checkpointed(b) for k, b in flags.items()} == {k: k == module for k in flags}
    assert not any(checkpointing.is_checkpointed(m) for m in ref.modules())
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in ref.named_parameters()]
    scope = {"encoder": "encoder", "predictor": "predictor", "diffusion": "diffloss.net"}[module]
    out_ref, g_ref, bytes_ref = saved_bytes(ref, batch, monkeypatch, scope=ref.get_submodule(scope))
    fused_blocks = []  # under the interpreter, the checkpointed head runs (and re-runs) the fused adaLN kernels
    real_ok = adaln._kernel_ok
    monkeypatch.setattr(adaln, "_kernel_ok", lambda *a: fused_blocks.append(real_ok(*a)) or fused_blocks[-1])
    out_ck, g_ck, bytes_ck = saved_bytes(ckpt, batch, monkeypatch, scope=ckpt.get_submodule(scope))
    if dispatch.interpreting():
        assert fused_blocks and all(fused_blocks)
    # fp32, the same ops recomputed on the same inputs: equal up to float32 reassociation
    torch.testing.assert_close(out_ck["loss"], out_ref["loss"], rtol=1e-6, atol=1e-7)
    assert g_ck.keys() == g_ref.keys() and len(g_ref) == len(list(ref.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_ck[name], g_ref[name], rtol=1e-5, atol=1e-7, msg=name)
    # what the module keeps for backward: its blocks' inputs instead of their internals
    print(module, bytes_ref, bytes_ck)
    assert bytes_ck < 0.5 * bytes_ref, (bytes_ck, bytes_ref)


def test_checkpointed_encoder_replays_the_drop_path_draws(batch, monkeypatch):
    """Non-reentrant checkpoint restores the RNG state in the recomputation: gradients match.
    Without that (``preserve_rng_state=False``) the drop-path masks differ and so do they."""
    ref, ckpt = twin_models("model.checkpointing=[encoder]")
    _, g_ref, _ = saved_bytes(ref, batch, monkeypatch)
    other, _, _ = saved_bytes(ref, batch, monkeypatch, seed=4)
    assert other["loss"] != saved_bytes(ref, batch, monkeypatch)[0]["loss"]  # drop-path is really drawing
    _, g_ck, _ = saved_bytes(ckpt, batch, monkeypatch)
    name = "encoder.blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(g_ck[name], g_ref[name], rtol=1e-5, atol=1e-7)
    no_rng = functools.partial(checkpointing._checkpoint, preserve_rng_state=False)
    monkeypatch.setattr(checkpointing, "_checkpoint", no_rng)
    ckpt.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    ckpt(*batch)["loss"].backward()
    assert not torch.allclose(ckpt.get_parameter(name).grad, g_ref[name], rtol=1e-3, atol=1e-6)


def test_no_checkpointing_without_autograd(batch, monkeypatch):
    calls = []
    monkeypatch.setattr(checkpointing, "_checkpoint", lambda *a, **k: calls.append(1))
    _, ckpt = twin_models("model.checkpointing=[encoder, predictor, diffusion]")
    with torch.no_grad():
        ckpt(*batch)
    assert calls == []


# ----------------------------------------------------------------------------- reconstruction_ratio


def _head_rows(model, inputs):
    rows = []
    handle = model.diffloss.net.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    torch.manual_seed(3)
    out = model(*inputs)
    handle.remove()
    return out, rows[0]


def test_reconstruction_ratio_one_sees_every_masked_token():
    cfg = tiny("model.diffusion.reconstruction_ratio=1.0", "model.diffusion.chunk_rows=0")
    torch.manual_seed(0)
    step = Stage1Step(cfg)
    video = torch.randn(2, 3, 4, 56, 56)
    tout = run_teacher(step.teacher, video, 64)
    from ivfast.training.step import draw_mask

    mask = draw_mask(cfg, SampleRNG(SEEDS), step.model.encoder.grid, tout.saliency)
    assert reconstruction_subset(mask.masked_idx, 1.0, SampleRNG(SEEDS)) is mask.masked_idx
    inputs = step.prepare(video, SampleRNG(SEEDS))
    assert torch.equal(inputs.recon_idx, mask.masked_idx)
    _, rows = _head_rows(step.model, inputs)
    assert rows == (mask.masked_idx.numel(), step.model.target_dim)


def test_reconstruction_ratio_half_uses_half_the_tokens_deterministically():
    full = prepared()
    half = prepared("model.diffusion.reconstruction_ratio=0.5")
    b, m = full.recon_idx.shape
    assert half.recon_idx.shape == (b, round(0.5 * m))
    assert half.diffusion_t.shape == (b * round(0.5 * m),)
    again = prepared("model.diffusion.reconstruction_ratio=0.5")
    assert torch.equal(half.recon_idx, again.recon_idx) and torch.equal(half.diffusion_seeds, again.diffusion_seeds)
    sub = half.recon_idx
    for i in range(b):
        assert set(sub[i].tolist()) <= set(full.recon_idx[i].tolist())
        assert torch.equal(sub[i], sub[i].unique())  # distinct, ascending
    # per sample: sample 0's subset depends on its own seed only, not on the batch around it
    alone = reconstruction_subset(full.recon_idx[:1], 0.5, SampleRNG(SEEDS[:1]))
    assert torch.equal(alone[0], sub[0])
    other = reconstruction_subset(full.recon_idx, 0.5, SampleRNG([21, 22]))
    assert not torch.equal(other, sub)
    _, model = twin_models("model.diffusion.reconstruction_ratio=0.5")
    _, rows = _head_rows(model, half)
    assert rows == (b * round(0.5 * m), model.target_dim)


# ----------------------------------------------------------------------------- diffusion precision


def _bf16_head(precision):
    torch.manual_seed(5)
    head = DiffusionLoss(target_channels=12, z_channels=16, width=32, depth=2, precision=precision)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.1)
    return head


@pytest.mark.kernels
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_fp32_head_under_bf16_params_computes_in_fp32(fused, monkeypatch):
    monkeypatch.setitem(dispatch._state, "fused", fused)
    head32 = _bf16_head("fp32")  # the fp32 twin: the same (bf16-representable) values
    head32.load_state_dict({k: v.bfloat16().float() for k, v in head32.state_dict().items()})
    head = copy.deepcopy(head32).bfloat16()
    head.precision = "fp32"
    seen = []
    for mod in (head.net.res_blocks[0], head.net.final_layer):
        mod.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    torch.manual_seed(6)
    z = torch.randn(10, 16).bfloat16().requires_grad_()
    target = torch.randn(10, 12).bfloat16()
    t = torch.randint(0, 1000, (10,))
    seeds = torch.arange(10, dtype=torch.int64) * 7919
    out = head(z, target, t, seeds)
    assert seen == [(torch.float32, torch.float32)] * 2
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    z32 = z.detach().float().requires_grad_()
    ref = head32(z32, target.float(), t, seeds)
    ref["loss"].backward()
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    grads32 = dict(head32.named_parameters())
    for name, p in head.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert p.grad.abs().sum() > 0, name
        # the fp32 gradient, rounded once to bf16 (one bf16 ulp of slack)
        torch.testing.assert_close(p.grad.float(), grads32[name].grad.bfloat16().float(), rtol=8e-3, atol=1e-6,
                                   msg=name)
    assert z.grad is not None and z.grad.dtype == torch.bfloat16


def test_auto_head_computes_in_the_training_dtype():
    head = _bf16_head("auto").bfloat16()
    seen = []
    head.net.res_blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    z, target = torch.randn(6, 16).bfloat16(), torch.randn(6, 12).bfloat16()
    head(z, target, torch.randint(0, 1000, (6,)), torch.arange(6, dtype=torch.int64))
    assert seen == [torch.bfloat16]


def test_stage1_bf16_model_with_fp32_diffusion_head(batch):
    cfg = tiny("model.diffusion.precision=fp32", "model.fused_kernels=false")
    torch.manual_seed(1)
    model = build_stage1(cfg)
    with torch.no_grad():  # past the zero init, so that gradients flow through the head to z
        for p in model.diffloss.parameters():
            p.normal_(0.0, 0.05)
    model = model.bfloat16().train()
    seen = []
    model.diffloss.net.res_blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    model.predictor.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    out = model(*batch._replace(video=batch.video.bfloat16()))
    assert seen == [torch.bfloat16, torch.float32]  # the predictor in bf16, the head in fp32
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.diffloss.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is not None and p.grad.dtype == torch.bfloat16, name
    assert model.predictor.layers[-1].mlp.Wo.weight.grad.abs().sum() > 0  # through the upcast z


# ----------------------------------------------------------------------------- teacher precision


@pytest.mark.parametrize("precision,train_dtype,expected", [
    ("bf16", torch.float32, torch.bfloat16), ("auto", torch.bfloat16, torch.bfloat16),
    ("auto", torch.float32, torch.float32), ("fp32", torch.bfloat16, torch.float32),
])
def test_teacher_precision_and_no_graph(precision, train_dtype, expected, batch):
    step = Stage1Step(tiny(f"model.teacher.precision={precision}"))
    step.to(torch.device("cpu"), train_dtype)
    assert {p.dtype for p in step.teacher.parameters()} == {expected}
    step.teacher.requires_grad_(True)  # even a teacher whose parameters asked for gradients keeps no graph
    with torch.enable_grad():
        tout = run_teacher(step.teacher, batch.video, 64)
    for t in (tout.layers, tout.pooled, tout.saliency):
        assert not t.requires_grad and t.grad_fn is None
    assert tout.layers.dtype == expected


# ----------------------------------------------------------------------------- allocator


def test_allocator_env_is_set_when_empty_and_kept_when_given():
    from ivfast.training.distributed import configure_allocator

    env = {}
    note = configure_allocator("expandable_segments:True", env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} and "train.allocator" in note
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    note = configure_allocator("expandable_segments:True", env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert note == ("allocator: PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128 from the environment wins over "
                    "train.allocator=expandable_segments:True")
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}  # torch's device-generic name counts too
    configure_allocator("expandable_segments:True", env)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    env = {}
    assert configure_allocator("", env) == "" and env == {}


# ----------------------------------------------------------------------------- end to end


def test_tiny_trains_two_steps_with_every_switch_on(tmp_path):
    """bf16 DeepSpeed ZeRO-3 (every parameter partitioned) with all memory switches through ivfast/train.py."""
    from tests.support import run_train
    from tests.support import step_metrics as metrics

    out = str(tmp_path / "lowmem")
    proc = run_train(out, ["train.max_steps=2", "data.batch_size=2", "train.precision=bf16",
                           "model.checkpointing=[encoder, predictor, diffusion]",
                           "model.diffusion.reconstruction_ratio=0.5", "model.diffusion.precision=fp32",
                           "model.teacher.precision=bf16", "train.allocator=expandable_segments:True",
                           "deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0"])
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["skipped_steps"] == 0 and r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in recs)
    assert "allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (train.allocator)" in proc.stderr
    assert "teacher: bfloat16" in proc.stderr


@pytest.mark.parametrize("extra", [[], ["model.checkpointing=[encoder, predictor]"]])
def test_lean_saves_keep_loss_and_grads_and_save_less(extra, batch, monkeypatch):
    """model.lean_saves (the default) against the plain composition, same weights, fp32: the same
    losses and gradients, less kept for backward (without checkpointing)."""
    both = [*extra, "model.diffusion.chunk_rows=0"]  # chunked, the head keeps only gradients either way
    ref, lean = twin_models(*both, base=both)
    with dispatch.override(lean=False):
        out_ref, g_ref, bytes_ref = saved_bytes(ref, batch, monkeypatch)
    with dispatch.override(lean=True):
        out_lean, g_lean, bytes_lean = saved_bytes(lean, batch, monkeypatch)
    for k in out_ref:
        torch.testing.assert_close(out_lean[k], out_ref[k], rtol=1e-6, atol=1e-7, msg=k)
    assert g_lean.keys() == g_ref.keys() and len(g_ref) == len(list(ref.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_lean[name], g_ref[name], rtol=1e-5, atol=1e-7, msg=name)
    if not extra:
        assert bytes_lean < 0.95 * bytes_ref, (bytes_lean, bytes_ref)  # fp32 tiny: the diffusion head dominates
