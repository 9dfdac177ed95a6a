"""A row-wise loss and its gradients computed chunk by chunk in the forward ("fused loss + backward").

The diffusion head's loss is a mean over independent rows (per-row t, per-row Philox noise
seeds). Plain autograd keeps the head's activations of *every* row until backward: at
ViT-B batch 16 that is 52,224 rows through six 1536-wide adaLN blocks, ~6.8 GiB in bf16.
:func:`chunked_row_loss` instead runs, during the forward, each chunk of at most
``chunk_rows`` rows through the loss *and its backward* (``torch.autograd.grad`` on the
chunk's share of the mean, ``(e - s) / M`` times the chunk's mean), as LLM trainers do with
"fused linear cross-entropy". What lives on until the step's backward is only

- the gradient w.r.t. the head's input z (M rows, z's dtype), and
- the gradients of the head's parameters, accumulated over the chunks in float32,

and the step's backward just scales them by the incoming gradient and hands them on: the
parameters' gradients arrive through this Function's backward like any other, so
DeepSpeed's gradient hooks (ZeRO-1/2 reduction) fire as usual. One chunk's activations and
its backward working set are a transient of the forward. Nothing is recomputed: each chunk's
forward and backward run exactly once, and with the same per-row computation (the caller's
``loss_fn`` on the chunk), so the values and random streams equal the unchunked path; only
the summation order of the mean and of the parameter gradients changes (float32 rounding).

What the chunks save for their own backward is freed at the end of the chunk; it runs under
identity ``saved_tensors_hooks``, so an outer hook (offloading, saved-tensor measurement)
sees only what this Function keeps. Not for DeepSpeed ZeRO-3: its parameters are gathered by
module hooks and their gradients partitioned by hooks that do not expect
``torch.autograd.grad`` inside the forward (``ivfast.config.chunking_allowed``: the step
builder switches chunking off there). A
target, t or seeds that needs a gradient is not supported (they get none).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch


def _same(t):
    return t


class _ChunkedRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss_fn, chunk_rows, z, target, t, seeds, *params):
        m = z.shape[0]
        grad_z = torch.zeros_like(z)
        grads = [None] * len(params)
        totals: Dict[str, torch.Tensor] = {}
        dtypes: Dict[str, torch.dtype] = {}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            for s in range(0, m, chunk_rows):
                e = min(s + chunk_rows, m)
                w = (e - s) / m
                z_c = z[s:e].detach().requires_grad_()
                out = loss_fn(z_c, target[s:e], t[s:e], seeds[s:e])
                got = torch.autograd.grad(out["loss"] * w, [z_c, *params], allow_unused=True)
                if got[0] is not None:
                    grad_z[s:e] = got[0]
                for i, g in enumerate(got[1:]):
                    if g is not None:
                        # a copy: autograd may hand the same tensor to two parameters
                        grads[i] = g.to(torch.float32, copy=True) if grads[i] is None else grads[i].add_(g)
                for k, v in out.items():
                    dtypes[k] = v.dtype
                    totals[k] = totals.get(k, 0.0) + v.detach().float() * w
                del out, got, z_c
        ctx.save_for_backward(grad_z, *grads)
        ctx.param_dtypes, ctx.chunk_rows = [p.dtype for p in params], chunk_rows
        loss = totals["loss"].to(dtypes["loss"])
        rest = [totals[k].to(dtypes[k]) if k in totals else loss.new_zeros(()) for k in ("mse", "vb")]
        ctx.mark_non_differentiable(*rest)
        return (loss, *rest)

    @staticmethod
    def backward(ctx, g, *_):
        grad_z, *grads = ctx.saved_tensors
        g = g.float()
        out_z = torch.empty_like(grad_z)
        for s in range(0, grad_z.shape[0], ctx.chunk_rows):  # g * grad_z in float32, a chunk at a time
            out_z[s:s + ctx.chunk_rows] = grad_z[s:s + ctx.chunk_rows].float() * g
        param_grads = [None if x is None else (x * g).to(dt) for x, dt in zip(grads, ctx.param_dtypes)]
        return (None, None, out_z, None, None, None, *param_grads)


def chunked_row_loss(loss_fn: Callable[..., Dict[str, torch.Tensor]], z: torch.Tensor, target: torch.Tensor,
                     t: torch.Tensor, seeds: torch.Tensor, params: Sequence[torch.Tensor],
                     chunk_rows: int) -> Dict[str, torch.Tensor]:
    """``loss_fn(z, target, t, seeds)`` (a dict of row means with "loss", "mse" and maybe "vb")
    computed ``chunk_rows`` rows at a time together with its gradients w.r.t. ``z`` and
    ``params`` (the trainable parameters ``loss_fn`` uses); only "loss" is differentiable
    ("vb" is a zero when ``loss_fn`` returns none)."""
    loss, mse, vb = _ChunkedRowLoss.apply(loss_fn, int(chunk_rows), z, target, t, seeds, *params)
    return {"loss": loss, "mse": mse, "vb": vb}
