"""model.diffusion.chunk_rows: the diffusion head's loss and gradients computed chunk by chunk in the
forward (ivfast.ops.chunked_loss) equal plain autograd, and keep far less for backward."""
from __future__ import annotations

import pytest
import torch

from ivfast.config import ConfigError, load_config
from ivfast.memory.saved_tensors import saved_bytes
from ivfast.models.diffloss import DiffusionLoss
from ivfast.ops import dispatch
from ivfast.training.activation_checkpoint import apply_activation_checkpointing

M, Z, C = 37, 16, 12


class _Owner(torch.nn.Module):
    """Gives the head the path activation checkpointing looks for (``diffloss.net.res_blocks``)."""

    def __init__(self, head):
        super().__init__()
        self.diffloss = head


def _head(learn_sigma, dtype, chunk_rows, checkpointing=False, precision="auto"):
    torch.manual_seed(0)
    head = DiffusionLoss(C, Z, width=32, depth=2, learn_sigma=learn_sigma, precision=precision,
                         chunk_rows=chunk_rows)
    with torch.no_grad():  # the zero-initialised adaLN / output layers would hide most gradients
        g = torch.Generator().manual_seed(2)
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if checkpointing:
        apply_activation_checkpointing(_Owner(head), ["diffusion"])
    return head.to(dtype)


def _inputs(dtype, m=M):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(m, Z, generator=g).to(dtype)
    target = torch.randn(m, C, generator=g).to(dtype)
    t = torch.randint(0, 1000, (m,), generator=g)
    seeds = torch.randint(0, 2**62, (m,), generator=g)
    return z, target, t, seeds


def _run(head, dtype, weight=0.7, fused=False):
    z, target, t, seeds = _inputs(dtype)
    z.requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with dispatch.override(fused=fused):
        out = head(z, target, t, seeds)
        (out["loss"] * weight).backward()
    return out, z.grad, {n: p.grad for n, p in head.named_parameters()}


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-6)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))])
@pytest.mark.parametrize("chunk_rows", [8, 64])
def test_chunked_equals_plain(learn_sigma, dtype, tol, chunk_rows):
    ref_out, ref_gz, ref_g = _run(_head(learn_sigma, dtype, 0), dtype)
    out, gz, g = _run(_head(learn_sigma, dtype, chunk_rows), dtype)
    assert out.keys() == ref_out.keys() == ({"loss", "mse", "vb"} if learn_sigma else {"loss", "mse"})
    for k in ref_out:
        assert out[k].dtype == ref_out[k].dtype, k
        torch.testing.assert_close(out[k], ref_out[k], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6, msg=k)
    assert not out["mse"].requires_grad and out["loss"].requires_grad
    assert gz.dtype == dtype
    torch.testing.assert_close(gz, ref_gz, **tol)
    assert g.keys() == ref_g.keys()
    for name in ref_g:
        assert g[name] is not None and g[name].dtype == ref_g[name].dtype, name
        torch.testing.assert_close(g[name], ref_g[name], **tol, msg=name)


@pytest.mark.kernels
@pytest.mark.parametrize("fused,checkpointing,precision", [(True, False, "auto"), (False, True, "auto"),
                                                           (False, False, "fp32")])
def test_chunked_with_fused_checkpointing_and_fp32_head(fused, checkpointing, precision):
    """Fused adaLN kernels, activation checkpointing of the blocks inside a chunk, and an fp32 head
    with bf16 parameters."""
    dtype = torch.bfloat16 if precision == "fp32" else torch.float32
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    ref = _run(_head(True, dtype, 0, checkpointing, precision), dtype, fused=fused)
    got = _run(_head(True, dtype, 8, checkpointing, precision), dtype, fused=fused)
    torch.testing.assert_close(got[0]["loss"], ref[0]["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], **tol)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **tol, msg=name)


def test_no_grad_forward_equals_plain():
    z, target, t, seeds = _inputs(torch.float32)
    with torch.no_grad():
        ref = _head(True, torch.float32, 0)(z, target, t, seeds)
        got = _head(True, torch.float32, 8)(z, target, t, seeds)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_chunked_saves_only_the_gradients():
    rows_total = 512
    z, target, t, seeds = _inputs(torch.float32, rows_total)
    z.requires_grad_(True)
    nbytes = {}
    for rows in (0, 64):
        head = _head(True, torch.float32, rows)
        got, out = saved_bytes(lambda: head(z, target, t, seeds), params=head.parameters())
        out["loss"].backward()
        nbytes[rows] = got.total
    params = sum(p.numel() for p in head.parameters())
    assert nbytes[64] == rows_total * Z * 4 + params * 4  # grad_z + float32 parameter gradients
    assert nbytes[64] < 0.1 * nbytes[0], nbytes


def test_negative_chunk_rows_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^config error: model.diffusion.chunk_rows = -1: must be >= 0"):
        load_config(None, ["model.diffusion.chunk_rows=-1"])
    assert load_config(None).model.diffusion.chunk_rows == 8192


def test_zero3_switches_chunking_off():
    from ivfast.training.step import Stage1Step

    assert Stage1Step(load_config("configs/tiny.yaml")).model.diffloss.chunk_rows == 8192
    assert Stage1Step(load_config("configs/tiny.yaml", ["deepspeed.zero_stage=3"])).model.diffloss.chunk_rows == 0


def test_deepspeed_zero2_two_ranks_chunked_match_one_rank_plain(tmp_path):
    """End to end: three chunks per step (192 rows per rank, chunk_rows 80) under 2-rank ZeRO-2
    train like one rank with plain autograd (ZeRO-1): DeepSpeed's gradient hooks see the chunked
    head's parameter gradients."""
    from tests.support import run_train
    from tests.support import step_metrics as metrics

    common = ["train.max_steps=4", "model.encoder.drop_path=0.0"]
    run_train(str(tmp_path / "one"), [*common, "data.batch_size=8", "model.diffusion.chunk_rows=0"])
    run_train(str(tmp_path / "two"), [*common, "data.batch_size=4", "deepspeed.zero_stage=2",
                                       "model.diffusion.chunk_rows=80"], nproc=2)
    one, two = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("loss", "loss_recon", "diff_mse", "diff_vb", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])
