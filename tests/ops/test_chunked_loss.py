"""ivfast.ops.chunked_loss: a row-wise loss and its gradients computed chunk by chunk in the forward
equal plain autograd, and only the gradients are kept for backward."""
import pytest
import torch

from ivfast.ops.chunked_loss import chunked_row_loss
from tests.ops.common import randn, saved_bytes

M, Z, C = 19, 8, 5


def head():
    return [randn(C, Z, seed=1, std=Z ** -0.5), randn(C, seed=2, std=0.1)]


def loss_fn(params):
    w, b = params

    def fn(z, target, t, seeds):
        err = (torch.nn.functional.linear(torch.tanh(z), w, b) - target).pow(2).mean(-1)
        weight = (t.float() + 1) / 10 + (seeds % 3).float()  # per-row inputs reach every row's loss
        return {"loss": (err * weight).mean(), "mse": err.mean()}

    return fn


def inputs():
    z = randn(M, Z, seed=3)
    target = randn(M, C, seed=4, grad=False)
    t, seeds = torch.arange(M) % 7, torch.arange(M) * 7919
    return z, target, t, seeds


@pytest.mark.parametrize("chunk_rows", [1, 5, 100])
def test_chunked_equals_plain(chunk_rows):
    params = head()
    z, target, t, seeds = inputs()
    out = chunked_row_loss(loss_fn(params), z, target, t, seeds, params, chunk_rows)
    assert set(out) == {"loss", "mse", "vb"} and out["vb"].item() == 0 and not out["mse"].requires_grad
    got = torch.autograd.grad(out["loss"] * 0.7, [z, *params])
    want_out = loss_fn(params)(z, target, t, seeds)
    want = torch.autograd.grad(want_out["loss"] * 0.7, [z, *params])
    torch.testing.assert_close(out["loss"], want_out["loss"])
    torch.testing.assert_close(out["mse"], want_out["mse"].detach())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_only_the_gradients_are_kept():
    params = head()
    z, target, t, seeds = inputs()
    kept = saved_bytes(lambda: chunked_row_loss(loss_fn(params), z, target, t, seeds, params, 4),
                       exclude=[z, target, *params])
    assert kept == z.nbytes + sum(p.numel() * 4 for p in params)  # grad z, float32 parameter gradients
