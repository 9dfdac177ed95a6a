"""The release's training-side defaults: lr scaling by the global batch, its warmup + cosine
schedule, the teacher layers of the ViT-L config and the weight-decay exemptions."""
import math

import numpy as np
import pytest
import torch

from ivfast.config import ConfigError, load_config
from ivfast.models.teacher import SigLIPTeacher, teacher_return_layers
from ivfast.training.optim import (
    LRSchedule,
    build_optimizer,
    effective_lr,
    param_groups,
)
from tests.support import stage1_model, stage2_model


# ----------------------------------------------------------------------------- lr scaling

# The paper runs on 128 GPUs: (config, peak lr, min lr, global batch).
PAPER_RUNS = [("stage1_b_diffusion", 8e-3, 8e-5, 2048), ("stage1_l_diffusion", 8e-3, 8e-5, 2048),
              ("stage2_b", 7e-4, 7e-5, 1792), ("stage2_l", 4e-4, 4e-5, 1024)]


@pytest.mark.parametrize("name,lr,min_lr,batch", PAPER_RUNS, ids=[r[0] for r in PAPER_RUNS])
def test_paper_configs_reach_the_release_peak_lr_on_128_gpus(name, lr, min_lr, batch):
    cfg = load_config(name, ["model.stage2.init_checkpoint=x"] if name.startswith("stage2") else [])
    assert cfg.train.lr_scaling == "batch256"
    eff = effective_lr(cfg.train, cfg.data.batch_size, 128)
    assert eff.global_batch == batch and eff.factor == batch / 256
    assert math.isclose(eff.lr, lr, rel_tol=1e-12) and math.isclose(eff.min_lr, min_lr, rel_tol=1e-12)
    assert eff.warmup_lr == 0.0


def test_scaling_counts_every_clip_of_an_optimiser_step():
    cfg = load_config("stage1_b_diffusion", ["train.grad_accum=2", "train.warmup_lr=1e-6"])
    eff = effective_lr(cfg.train, 16, 64)  # 16 x 64 x 2 = 2048 clips, as the release's update_freq
    assert eff.global_batch == 2048 and math.isclose(eff.lr, 8e-3) and math.isclose(eff.warmup_lr, 8e-6)


@pytest.mark.parametrize("name", ["tiny", "stage2_tiny"])
def test_tiny_configs_use_absolute_rates(name):
    cfg = load_config(name)
    assert cfg.train.lr_scaling == "none"
    for world in (1, 8):
        eff = effective_lr(cfg.train, cfg.data.batch_size, world)
        assert (eff.lr, eff.min_lr, eff.factor) == (cfg.train.lr, cfg.train.min_lr, 1.0)


def test_warmup_lr_is_validated():
    with pytest.raises(ConfigError, match="train.warmup_lr = -1.0"):
        load_config("tiny", ["train.warmup_lr=-1"])


# ----------------------------------------------------------------------------- schedule


def release_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                             start_warmup_value=0.0):
    """The release's utils.cosine_scheduler, written out again (numpy linspace warmup, then a
    per-iteration cosine), as main_stage1/2.py call it: start_warmup_value left at 0."""
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    n = epochs * niter_per_ep - warmup_iters
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * np.arange(n) / n))
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("epochs,niter,warmup_epochs,warmup_lr", [
    (62, 10, 7, 0.0),  # Stage 1 (the release's epochs and warmup, 10 steps an epoch)
    (101, 7, 0, 0.0),  # Stage 2: no warmup
    (5, 3, 2, 0.0), (4, 1, 1, 0.0),  # a one-step warmup: that step at the warmup start
    (6, 5, 2, 1e-6)])  # a non-zero start (train.warmup_lr)
def test_schedule_is_the_release_cosine_scheduler(epochs, niter, warmup_epochs, warmup_lr):
    cfg = load_config("stage1_b_diffusion", [f"train.warmup_lr={warmup_lr}"])
    eff = effective_lr(cfg.train, cfg.data.batch_size, 128)
    total, warmup = epochs * niter, warmup_epochs * niter  # as the trainer derives them
    schedule = LRSchedule(eff.lr, eff.min_lr, total, warmup, eff.warmup_lr)
    ref = release_cosine_scheduler(eff.lr, eff.min_lr, epochs, niter, warmup_epochs, eff.warmup_lr)
    assert len(ref) == total
    ours = np.array([schedule.lr(i) for i in range(total)])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-18)
    assert schedule.lr(0) == (eff.warmup_lr if warmup else eff.lr)
    assert math.isclose(schedule.lr(total), eff.min_lr)  # past the end: min_lr


# ----------------------------------------------------------------------------- teacher layers


def test_large_config_distills_the_release_teacher_layers():
    """ivfast's teacher layer i is the hidden state entering 0-based layer i (0: the patch
    embeddings; i: the output of the i-th layer), as the release's encoder loop collects them."""
    for name, interval, want in (("stage1_b_diffusion", 3.33, (23, 26, 30, 33, 36, 39)),
                                 ("stage1_l_diffusion", 1.67, (31, 33, 34, 36, 38, 39))):
        t = load_config(name).model.teacher
        k = load_config(name).model.align.num_layers
        assert (t.depth, k, t.layer_interval) == (40, 6, interval)
        release = sorted(t.depth - int(i * t.layer_interval) - 1 for i in range(k))
        assert tuple(teacher_return_layers(t.depth, k, t.layer_interval)) == tuple(release) == want


def test_teacher_layer_index_is_the_input_of_that_zero_based_layer():
    torch.manual_seed(0)
    teacher = SigLIPTeacher(img_size=32, patch_size=16, width=32, depth=4, heads=2, mlp_dim=64, return_layers=[1, 3])
    pixels = torch.randn(2, 3, 32, 32)
    out = teacher(pixels)
    x, inputs = teacher.embeddings(pixels), []
    for layer in teacher.encoder.layers:  # the release: collect before running layer_id
        inputs.append(x)
        x = layer(x)
    for j, i in enumerate((1, 3)):
        torch.testing.assert_close(out.layers[j], torch.nn.functional.normalize(inputs[i], dim=-1))


# ----------------------------------------------------------------------------- weight decay


def groups_by_name(model, rule):
    ids = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, rule)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    return {g["name"]: {ids[id(p)] for p in g["params"]} for g in groups}


def release_rule(named_shapes):
    """optim_factory.get_parameter_groups on the release's names and shapes: 1-D, '.bias' or
    in no_weight_decay() (exact names)."""
    skip = {"pos_embed", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_cls", "cls_token", "clip_pos_embed",
            "clip_pos_embed_spatial", "clip_pos_embed_temporal", "clip_pos_embed_cls"}
    return {n for n, shape in named_shapes if len(shape) == 1 or n.endswith(".bias") or n in skip}


# ivfast name -> the release's (name, shape) for the parameters whose name or shape differ.
TO_RELEASE = {"encoder.pos.table": ("pos_embed", 3), "encoder.cls_token": ("cls_token", 3),
              "align_pos.table": ("clip_pos_embed", 3), "predictor_pos.table": ("diff_pos_embed", 3),
              "mask_token": ("bert_mask_token", 3)}


@pytest.mark.parametrize("stage", [1, 2])
def test_decay_groups_under_both_rules(stage):
    cfg = load_config("tiny") if stage == 1 else load_config("stage2_tiny", ["model.stage2.init_checkpoint=x"])
    torch.manual_seed(0)
    model = stage1_model(cfg) if stage == 1 else stage2_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    release, tables = groups_by_name(model, "release"), groups_by_name(model, "all_tables")
    for groups in (release, tables):
        assert groups["decay"] | groups["no_decay"] == trainable and not groups["decay"] & groups["no_decay"]
    assert not any(n.startswith("teacher.") for n in release["decay"] | release["no_decay"])
    # The one difference: the release decays the diffusion position table and the mask token.
    assert release["decay"] - tables["decay"] == {"predictor_pos.table", "mask_token"}
    assert tables["decay"] - release["decay"] == set()
    exempt_tables = {"encoder.pos.table", "encoder.cls_token"} | ({"align_pos.table"} if stage == 1 else set())
    assert exempt_tables <= release["no_decay"] and {"predictor_pos.table", "mask_token"} <= release["decay"]
    # The release's own rule on the release's names and shapes gives the same groups.
    named = {n: TO_RELEASE.get(n, (n, p.ndim)) for n, p in model.named_parameters()
             if p.requires_grad}
    exempt = release_rule([(rn, (1,) * nd) for rn, nd in named.values()])
    assert {n for n, (rn, _) in named.items() if rn in exempt} == release["no_decay"]
    # build_optimizer follows train.no_decay (default: release).
    assert cfg.train.no_decay == "release"
    for rule, want in (("release", release), ("all_tables", tables)):
        cfg.train.no_decay = rule
        opt = build_optimizer(model, cfg.train, torch.device("cpu"), lr=1e-3)
        assert [len(g["params"]) for g in opt.param_groups] == [len(want["decay"]), len(want["no_decay"])]
        assert all(g["lr"] == 1e-3 for g in opt.param_groups)
