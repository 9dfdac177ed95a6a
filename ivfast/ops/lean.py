"""Lean autograd Functions: the same values and gradients as the plain composition of ops,
saving less for backward. Each API function runs its Function when lean saves are on and
autograd records outside autocast (:func:`ivfast.ops.dispatch.lean_applies`), else the plain ops.

- ``gelu_mlp``: ``fc2(GELU(fc1(x)))``; saves x and fc1's output, recomputes GELU for fc2's
  weight gradient (autograd also keeps GELU(h): one hidden-wide tensor less).
- ``geglu_mlp``: ``Wo(GELU(inp) * gate)``, ``inp, gate = Wi(x).chunk(2)``; saves x and Wi's
  output (autograd also keeps GELU(inp) and the product: two hidden-wide tensors less).
- ``norm_linear`` / ``norm_geglu_mlp``: a bias-free Linear (or the GeGLU MLP) of
  ``F.layer_norm(x)``; save x and the norm's mean and rstd, not its output, which backward
  recomputes with the forward's own kernel (``native_layer_norm``: the same bits; the CPU keeps
  bf16 stats in bf16, so rebuilding it from them would not match).
- ``layer_scale``: ``(x.float() * gamma.float()).to(x.dtype)``; saves x in its own dtype, not
  the fp32 copy (half the bytes under bf16).
- ``cosine_align``: ``(2 - 2 (pred . target)).mean()`` in float32 for a target that needs no
  gradient; saves the target as it is, not its fp32 copy.
- ``layer_norm_l2``: ``F.normalize(F.layer_norm(x))``; saves x only.
- ``recompute_rows``: a row-wise elementwise function of tensors (no parameters, no randomness);
  saves its inputs and runs it again in backward, a chunk of rows at a time.

No matmul is recomputed; backward runs the same aten ops as autograd's (``gelu_backward``,
``native_layer_norm_backward``). Modules pass their own parameters (DeepSpeed ZeRO-3 gathers
them on access), and a checkpointed block recomputes through these like any other op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ivfast.ops.dispatch import lean_applies


def _mm_grads(grad2d: torch.Tensor, inp2d: torch.Tensor, weight: torch.Tensor):
    """Linear's backward on 2-D views: (grad of its input, grad of its weight)."""
    return grad2d @ weight, grad2d.t() @ inp2d


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate):
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        ctx.has_b1, ctx.has_b2, ctx.approximate = b1 is not None, b2 is not None, approximate
        return F.linear(F.gelu(h, approximate=approximate), w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, h, w1, w2 = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        act = F.gelu(h, approximate=ctx.approximate).reshape(-1, h.shape[-1])  # fc2's input, recomputed
        grad_act, grad_w2 = _mm_grads(g2, act, w2)
        del act
        grad_b2 = g2.sum(0) if ctx.has_b2 and ctx.needs_input_grad[4] else None
        grad_h = torch.ops.aten.gelu_backward(grad_act, h.reshape(-1, h.shape[-1]), approximate=ctx.approximate)
        del grad_act
        grad_x, grad_w1 = _mm_grads(grad_h, x.reshape(-1, x.shape[-1]), w1)
        grad_b1 = grad_h.sum(0) if ctx.has_b1 and ctx.needs_input_grad[2] else None
        return grad_x.reshape(x.shape), grad_w1, grad_b1, grad_w2, grad_b2, None


def _geglu_out(h: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    inp, gate = h.chunk(2, dim=-1)
    return F.linear(F.gelu(inp) * gate, wo)


def _geglu_backward(grad: torch.Tensor, h: torch.Tensor, wo: torch.Tensor, need_wo: bool):
    """GeGLU's backward from Wi's output ``h``: (grad of ``h`` on 2-D rows, grad of ``wo`` or None).
    At most three hidden-wide temporaries: grad_h (two) + Wo's input, then + grad_prod."""
    h2 = h.reshape(-1, h.shape[-1])
    inp, gate = h2.chunk(2, dim=-1)
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_h = torch.empty_like(h2)
    grad_inp, grad_gate = grad_h.chunk(2, dim=-1)
    act = torch.ops.aten.gelu.out(inp, approximate="none", out=grad_gate)  # recomputed, in place
    grad_wo = g2.t() @ (act * gate) if need_wo else None  # Wo's input, recomputed
    grad_prod = g2 @ wo
    grad_gate.mul_(grad_prod)  # GELU(inp) * grad_prod
    grad_prod.mul_(gate)
    torch.ops.aten.gelu_backward.grad_input(grad_prod, inp, approximate="none", grad_input=grad_inp)
    return grad_h, grad_wo


class _GegluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wi, wo):
        h = F.linear(x, wi)
        ctx.save_for_backward(x, h, wi, wo)
        return _geglu_out(h, wo)

    @staticmethod
    def backward(ctx, grad):
        x, h, wi, wo = ctx.saved_tensors
        grad_h, grad_wo = _geglu_backward(grad, h, wo, ctx.needs_input_grad[2])
        grad_x, grad_wi = _mm_grads(grad_h, x.reshape(-1, x.shape[-1]), wi)
        return grad_x.reshape(x.shape), grad_wi, grad_wo


def _norm_linear_grads(ctx, grad2d, x, ln_weight, ln_bias, weight, need_weight: bool, need_norm: bool):
    """The Linear's part of ``F.linear(LayerNorm(x), weight)``'s backward, from its output's grad
    on 2-D rows: (grad of ``weight``, grad of the LayerNorm's output), None where not needed.
    The Linear's input is recomputed by the forward's own kernel (the same bits; one width-wide
    tensor, freed before the grad of it is made)."""
    grad_w = grad_y = None
    if need_weight:
        y = torch.ops.aten.native_layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ctx.eps)[0]
        grad_w = grad2d.t() @ y.reshape(-1, y.shape[-1])
        del y
    if need_norm:
        grad_y = (grad2d @ weight).reshape(x.shape)
    return grad_w, grad_y


def _norm_grads(grad_y, x, mean, rstd, ln_weight, ln_bias, needs):
    """The LayerNorm's backward (autograd's kernel): grads of (x, ln_weight, ln_bias) as ``needs``."""
    mask = [bool(needs[0]), bool(needs[1] and ln_weight is not None), bool(needs[2] and ln_bias is not None)]
    if grad_y is None or not any(mask):
        return None, None, None
    return tuple(torch.ops.aten.native_layer_norm_backward(grad_y, x, (x.shape[-1],), mean, rstd, ln_weight,
                                                           ln_bias, mask))


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, weight):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, mean, rstd, ln_weight, ln_bias, weight)
        ctx.eps = eps
        return F.linear(y, weight)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
        n = ctx.needs_input_grad
        grad_w, grad_y = _norm_linear_grads(ctx, grad.reshape(-1, grad.shape[-1]), x, ln_weight, ln_bias, weight,
                                            n[4], any(n[:3]))
        return (*_norm_grads(grad_y, x, mean, rstd, ln_weight, ln_bias, n), None, grad_w)


class _NormGegluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, wi, wo):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
        h = F.linear(y, wi)
        del y
        ctx.save_for_backward(x, mean, rstd, h, ln_weight, ln_bias, wi, wo)
        ctx.eps = eps
        return _geglu_out(h, wo)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, h, ln_weight, ln_bias, wi, wo = ctx.saved_tensors
        n = ctx.needs_input_grad
        grad_h, grad_wo = _geglu_backward(grad, h, wo, n[5])
        grad_wi, grad_y = _norm_linear_grads(ctx, grad_h, x, ln_weight, ln_bias, wi, n[4], any(n[:3]))
        del grad_h  # before the norm's backward, like autograd's order
        return (*_norm_grads(grad_y, x, mean, rstd, ln_weight, ln_bias, n), None, grad_wi, grad_wo)


def _plain_layer_scale(x, gamma):
    return (x.float() * gamma.float()).to(x.dtype)


def _plain_cosine_align(pred, target):
    return (2.0 - 2.0 * (pred.float() * target.float()).sum(dim=-1)).mean()


def _plain_layer_norm_l2(x, weight, bias, eps):
    return F.normalize(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), dim=-1)


class _LayerScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma):
        ctx.save_for_backward(x, gamma)
        return _plain_layer_scale(x, gamma)

    @staticmethod
    def backward(ctx, grad):
        x, gamma = ctx.saved_tensors
        g = grad.float()
        grad_x = (g * gamma.float()).to(x.dtype)
        grad_gamma = (g * x.float()).sum_to_size(gamma.shape).to(gamma.dtype)
        return grad_x, grad_gamma


class _CosineAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(target)
        ctx.pred_dtype, ctx.count = pred.dtype, pred[..., 0].numel()
        return _plain_cosine_align(pred, target)

    @staticmethod
    def backward(ctx, grad):
        (target,) = ctx.saved_tensors
        g = (grad / ctx.count).expand(target.shape[:-1])
        g = -g * 2.0
        return (g.unsqueeze(-1) * target.float()).to(ctx.pred_dtype), None


class _LayerNormL2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight, bias)
        ctx.eps = eps
        return _plain_layer_norm_l2(x, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        leaves = [None if t is None else t.detach().requires_grad_(n)
                  for t, n in zip((x, weight, bias), ctx.needs_input_grad[:3])]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        with torch.enable_grad():  # the same two ops again, then their autograd backward
            out = _plain_layer_norm_l2(*leaves, ctx.eps)
            grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves) + (None,)


class _RecomputeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, chunk, *xs):
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(*xs)
        return fn(*xs)

    @staticmethod
    def backward(ctx, grad):
        xs = ctx.saved_tensors
        needs = [n and x.is_floating_point() for x, n in zip(xs, ctx.needs_input_grad[2:])]
        grads = [torch.zeros_like(x) if n else None for x, n in zip(xs, needs)]
        for lo in range(0, xs[0].shape[0], ctx.chunk):  # rows are independent: one chunk's graph at a time
            leaves = [x[lo:lo + ctx.chunk].detach().requires_grad_(n) for x, n in zip(xs, needs)]
            wanted = [x for x in leaves if x.requires_grad]
            with torch.enable_grad():
                out = ctx.fn(*leaves)
                got = iter(torch.autograd.grad(out, wanted, grad[lo:lo + ctx.chunk], allow_unused=True))
            for g, n in zip(grads, needs):
                if n:
                    part = next(got)
                    if part is not None:
                        g[lo:lo + ctx.chunk] = part
        return (None, None) + tuple(grads)


# =========================================================================== API
def _plain_mlp(x, w1, b1, w2, b2, approximate="none"):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)``;
    ``approximate``: "none" (erf GELU) or "tanh" (the release's fused MLP)."""
    if lean_applies(x):
        return _GeluMLP.apply(x, w1, b1, w2, b2, approximate)
    return _plain_mlp(x, w1, b1, w2, b2, approximate)


def geglu_mlp(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """``F.linear(F.gelu(inp) * gate, wo)`` with ``inp, gate = F.linear(x, wi).chunk(2, -1)``."""
    if lean_applies(x):
        return _GegluMLP.apply(x, wi, wo)
    return _geglu_out(F.linear(x, wi), wo)


def norm_linear(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
                weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(F.layer_norm(x, (D,), ln_weight, ln_bias, eps), weight)``."""
    if lean_applies(x):
        return _NormLinear.apply(x, ln_weight, ln_bias, eps, weight)
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight)


def norm_geglu_mlp(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
                   wi: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """:func:`geglu_mlp` of ``F.layer_norm(x, (D,), ln_weight, ln_bias, eps)``."""
    if lean_applies(x):
        return _NormGegluMLP.apply(x, ln_weight, ln_bias, eps, wi, wo)
    return _geglu_out(F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), wi), wo)


def layer_scale(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``(x.float() * gamma.float()).to(x.dtype)``."""
    if lean_applies(x):
        return _LayerScale.apply(x, gamma)
    return _plain_layer_scale(x, gamma)


def cosine_align(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(2 - 2 * (pred.float() * target.float()).sum(-1)).mean()``, a 0-dim float32 tensor."""
    if not target.requires_grad and lean_applies(pred):
        return _CosineAlign.apply(pred, target)
    return _plain_cosine_align(pred, target)


def layer_norm_l2(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.normalize(F.layer_norm(x, (D,), weight, bias, eps), dim=-1)``."""
    if lean_applies(x):
        return _LayerNormL2.apply(x, weight, bias, eps)
    return _plain_layer_norm_l2(x, weight, bias, eps)


def recompute_rows(fn, *xs: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``fn(*xs)``; lean: saving only ``xs`` and running ``fn`` again in backward, ``chunk`` rows at
    a time. Every x has the rows first and ``fn`` maps rows to rows independently."""
    if lean_applies(xs[0]):
        return _RecomputeRows.apply(fn, int(chunk), *xs)
    return fn(*xs)
