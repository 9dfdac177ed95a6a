"""The one attention entry point used by the encoder, teacher, predictor and heads.

:func:`attention` takes (B, H, N, Dh) tensors (dense), or packed (total, H, Dh) tensors
with ``cu_seqlens`` (varlen: several sequences of different lengths, each attending only
to itself), and an optional sliding ``window`` (half width: query i sees key j when
|i - j| <= window). Scale is always ``Dh ** -0.5``, no dropout, no causal mask.

Backends (:func:`set_backend`, or ``model.attention`` in the config):

- ``flash``: flash-attn (FA3 ``flash_attn_interface`` on Hopper when importable, else
  flash-attn 2 ``flash_attn``), imported lazily on the first call that could use it.
  Serves CUDA float16/bfloat16 calls with head dim <= 256 (compute capability >= 8.0);
  windows natively (``window_size=(w, w)``), varlen natively.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; windows through a
  boolean mask; varlen by running each sequence separately.
- ``flex``: ``torch`` FlexAttention with a sliding-window block mask (cached per
  (N, window, device)), varlen through a document mask; compiled on CUDA. On the CPU it
  runs eagerly and only without autograd (torch has no CPU backward for it).
- ``math``: explicit softmax(QK^T / sqrt(Dh)) V in float32: the reference. Never chosen
  by ``auto``.
- ``auto`` (default): flash when installed and applicable, else (on CUDA, for windowed or
  varlen calls) flex, else sdpa.

A backend asked for explicitly that cannot serve a call (device, dtype, head dim,
autograd on CPU, missing package) hands it to the next one (flash -> flex (CUDA windowed
or varlen calls) -> sdpa; flex -> sdpa), with an :class:`AttentionFallbackWarning` shown
once per (backend, reason) that names what was asked and what runs instead. Running the
sequences of a varlen call one by one (sdpa, math) also warns once. Nothing falls back
silently to something that computes a different function.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ivfast.ops.dispatch import autocast_off

__all__ = [
    "BACKENDS",
    "AttentionFallbackWarning",
    "attention",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "describe_backend",
    "flash_attn_info",
    "flex_available",
    "reset_fallback_warnings",
    "window_mask",
]

BACKENDS = ("auto", "flash", "sdpa", "flex", "math")
FLASH_MAX_HEAD_DIM = 256


class AttentionFallbackWarning(UserWarning):
    """A requested attention backend could not serve a call; another one ran it."""


def _initial_backend() -> str:
    name = os.environ.get("IVFAST_ATTENTION", "auto").strip().lower() or "auto"
    return name if name in BACKENDS else "auto"


_backend: str = _initial_backend()
_warned: set = set()


# ----------------------------------------------------------------------------- selection


def set_backend(name: str) -> str:
    """Select the backend for every later call (``auto``, ``flash``, ``sdpa``, ``flex``,
    ``math``); returns the previous one. Never fails for a backend that is merely
    unavailable here: calls then fall back, with a one-time warning."""
    global _backend
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    previous, _backend = _backend, key
    return previous


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("math"): ...`` selects a backend for a block."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def reset_fallback_warnings() -> None:
    """Forget which fallback warnings were shown (so that they show again; for tests)."""
    _warned.clear()


def _warn_once(key, message: str, stacklevel: int = 4) -> None:
    """Warn once per key; the default stacklevel points at attention()'s caller via _choose."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, AttentionFallbackWarning, stacklevel=stacklevel)


# ----------------------------------------------------------------------------- optional packages

_flash_state: dict | None = None


def flash_attn_info() -> dict:
    """What flash-attn this process has, importing it on the first call:
    ``{"available": bool, "version": str | None, "fa2": module | None, "fa3": module | None,
    "error": str | None}``."""
    global _flash_state
    if _flash_state is not None:
        return _flash_state
    state = {"available": False, "version": None, "fa2": None, "fa3": None, "error": None}
    errors = []
    if _has_module("flash_attn_interface"):
        try:
            state["fa3"] = importlib.import_module("flash_attn_interface")
        except Exception as e:  # a broken build raises OSError/RuntimeError, not only ImportError
            errors.append(f"flash_attn_interface: {type(e).__name__}: {e}")
    if _has_module("flash_attn"):
        try:
            fa2 = importlib.import_module("flash_attn")
            state["fa2"] = fa2
            state["version"] = getattr(fa2, "__version__", "unknown")
        except Exception as e:
            errors.append(f"flash_attn: {type(e).__name__}: {e}")
    if state["fa3"] is not None and state["version"] is None:
        try:
            from importlib.metadata import version

            state["version"] = version("flash_attn_3")
        except Exception:
            state["version"] = "3 (flash_attn_interface)"
    state["available"] = state["fa2"] is not None or state["fa3"] is not None
    if not state["available"]:
        state["error"] = "; ".join(errors) if errors else "flash-attn is not installed"
    _flash_state = state
    return state


@functools.lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _flash_installed() -> bool:
    if _flash_state is not None:
        return _flash_state["available"]
    return _has_module("flash_attn") or _has_module("flash_attn_interface")


_flex_mod = None
_flex_checked = False


def _flex_module():
    global _flex_mod, _flex_checked
    if not _flex_checked:
        _flex_checked = True
        try:
            _flex_mod = importlib.import_module("torch.nn.attention.flex_attention")
        except Exception:
            _flex_mod = None
    return _flex_mod


def flex_available() -> bool:
    """True when this torch has FlexAttention."""
    return _flex_module() is not None


# ----------------------------------------------------------------------------- the call


@dataclass
class _Call:
    """What a call needs, for deciding which backend can serve it."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    window: int | None  # normalised: None when global
    varlen: bool
    needs_grad: bool
    num_seqs: int = 1
    cuda_capability: tuple | None = None

    def kind(self) -> str:
        shape = "varlen" if self.varlen else "dense"
        win = f"windowed (w={self.window})" if self.window is not None else "global"
        dt = str(self.dtype).replace("torch.", "")
        return f"{win} {shape} {dt} call on {self.device_type}, head dim {self.head_dim}"


def _norm_window(window, n_max: int) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        try:
            window = int(window)
        except (TypeError, ValueError):
            raise TypeError(f"window must be an int or None, got {window!r}") from None
    if window < 0:
        raise ValueError(f"window must be >= 0 (half width), got {window}")
    return None if window >= n_max - 1 else window


def _capability(device: torch.device):
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.get_device_capability(device)
    except Exception:
        return None


# ----------------------------------------------------------------------------- who can serve what


def _flash_reason(c: _Call) -> str | None:
    if c.device_type != "cuda":
        return f"flash-attn needs CUDA tensors, got {c.device_type}"
    if c.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16/bfloat16, got {str(c.dtype).replace('torch.', '')}"
    if c.head_dim > FLASH_MAX_HEAD_DIM:
        return f"flash-attn supports head dim <= {FLASH_MAX_HEAD_DIM}, got {c.head_dim}"
    if not _flash_installed():
        return "flash-attn is not installed"
    info = flash_attn_info()
    if not info["available"]:
        return f"flash-attn could not be imported ({info['error']})"
    cap = c.cuda_capability
    if cap is not None and cap < (8, 0):
        return f"flash-attn needs compute capability >= 8.0, got {cap[0]}.{cap[1]}"
    uses_fa3 = info["fa3"] is not None and cap is not None and cap[0] == 9
    if info["fa2"] is None and not uses_fa3:
        return "only FA3 (flash_attn_interface) is installed and it needs a Hopper GPU"
    if c.window is not None and not uses_fa3 and _version_tuple(info["version"]) < (2, 3):
        return f"flash-attn {info['version']} has no sliding window (needs >= 2.3)"
    return None


def _version_tuple(text) -> tuple:
    """'2.6.3+cu12' -> (2, 6, 3); unparseable -> (0,)."""
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text or ""))
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def _flex_reason(c: _Call) -> str | None:
    if not flex_available():
        return "this torch has no FlexAttention"
    if c.device_type not in ("cuda", "cpu"):
        return f"FlexAttention here serves CUDA and CPU tensors, got {c.device_type}"
    if c.device_type == "cpu" and c.needs_grad:
        return "FlexAttention has no backward on CPU (inputs require grad)"
    if c.device_type == "cuda":
        if c.head_dim < 16:
            return f"FlexAttention on CUDA needs head dim >= 16, got {c.head_dim}"
        if not _has_module("triton"):
            return "FlexAttention on CUDA needs triton, which is not installed"
    return None


def _reason(name: str, c: _Call) -> str | None:
    if name == "flash":
        return _flash_reason(c)
    if name == "flex":
        return _flex_reason(c)
    return None  # sdpa and math serve every call (varlen by splitting)


def _next(name: str, c: _Call) -> str:
    if name == "flash" and c.device_type == "cuda" and (c.window is not None or c.varlen):
        return "flex"
    return "sdpa"


def _choose(name: str, c: _Call, warn: bool) -> tuple[str, list]:
    """(backend that runs the call, [(backend skipped, why), ...])."""
    if name == "auto":
        flash_why = _flash_reason(c)
        if flash_why is None:
            return "flash", []
        skipped = [("flash", flash_why)]
        if c.device_type == "cuda" and (c.window is not None or c.varlen):
            flex_why = _flex_reason(c)
            if flex_why is None:
                return "flex", skipped
            skipped.append(("flex", flex_why))
        return "sdpa", skipped  # auto picks silently among what is applicable
    asked, skipped = name, []
    while True:
        why = _reason(name, c)
        if why is None:
            break
        skipped.append((name, why))
        name = _next(name, c)
    if warn:
        for bad, why in skipped:
            who = f"backend '{asked}'" if bad == asked else f"backend '{asked}' (via its fallback '{bad}')"
            _warn_once(
                ("fallback", bad, why),
                f"ivfast attention: {who} cannot serve a {c.kind()} ({why}); running '{name}' instead. "
                f"(Shown once per reason.)",
            )
    return name, skipped


# ----------------------------------------------------------------------------- masks


_MASK_CACHE_SIZE = 32
_dense_masks: OrderedDict = OrderedDict()
_block_masks: OrderedDict = OrderedDict()


def _cache_get(cache: OrderedDict, key, make):
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = make()
    cache[key] = value
    while len(cache) > _MASK_CACHE_SIZE:
        cache.popitem(last=False)
    return value


def window_mask(n: int, window: int, device) -> torch.Tensor:
    """Boolean (n, n) mask, True where query i may attend key j: |i - j| <= window."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= window


def _cached_window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    return _cache_get(_dense_masks, (n, window, str(device)), lambda: window_mask(n, window, device))


def _sliding_block_mask(n: int, window: int, device: torch.device):
    flex = _flex_module()

    def make():
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= window

        return flex.create_block_mask(mask_mod, None, None, n, n, device=device)

    return _cache_get(_block_masks, ("sliding", n, window, str(device)), make)


def _document_block_mask(bounds: tuple, window: int | None, device: torch.device):
    flex = _flex_module()

    def make():
        lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        total = bounds[-1]

        if window is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return doc[q_idx] == doc[kv_idx]
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return (doc[q_idx] == doc[kv_idx]) & ((q_idx - kv_idx).abs() <= window)

        return flex.create_block_mask(mask_mod, None, None, total, total, device=device)

    return _cache_get(_block_masks, ("doc", bounds, window, str(device)), make)


# ----------------------------------------------------------------------------- dense runners


def _math_dense(q, k, v, window):
    scale = q.shape[-1] ** -0.5
    with autocast_off(q.device):
        s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
        if window is not None:
            s = s.masked_fill(~_cached_window_mask(q.shape[-2], window, q.device), float("-inf"))
        p = s.softmax(dim=-1)
        return torch.matmul(p, v.float()).to(q.dtype)


def _sdpa_dense(q, k, v, window):
    mask = None if window is None else _cached_window_mask(q.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_flex_compiled = None


def _flex_call(q, k, v, block_mask):
    flex = _flex_module()
    if q.device.type == "cuda":
        global _flex_compiled
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex.flex_attention)
        return _flex_compiled(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # eager on the CPU is what we want here (tests, tiny runs)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex.flex_attention(q, k, v, block_mask=block_mask)


def _flex_dense(q, k, v, window):
    bm = None if window is None else _sliding_block_mask(q.shape[-2], window, q.device)
    return _flex_call(q, k, v, bm)


def _flash_window(window):
    return (-1, -1) if window is None else (window, window)


def _flash_fns(device: torch.device):
    info = flash_attn_info()
    cap = _capability(device)
    if info["fa3"] is not None and cap is not None and cap[0] == 9:
        return info["fa3"].flash_attn_func, info["fa3"].flash_attn_varlen_func
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _flash_dense(q, k, v, window):
    dense_fn, _ = _flash_fns(q.device)
    out = _first(dense_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          causal=False, window_size=_flash_window(window)))
    return out.transpose(1, 2)  # (B, N, H, Dh) -> (B, H, N, Dh), a view


_DENSE = {"math": _math_dense, "sdpa": _sdpa_dense, "flex": _flex_dense, "flash": _flash_dense}


# ----------------------------------------------------------------------------- varlen runners


def _bounds(cu_seqlens: torch.Tensor, total: int) -> tuple:
    b = tuple(int(x) for x in cu_seqlens.tolist())
    if b[0] != 0 or b[-1] != total or any(e < s for s, e in zip(b[:-1], b[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at total={total}; got {list(b)}")
    return b


def _varlen_split(name, q, k, v, window, bounds):
    run = _DENSE[name]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        sl = [t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, L, Dh)
        outs.append(run(*sl, _norm_window(window, e - s)).squeeze(0).transpose(0, 1))
    if not outs:
        return q * 0
    return torch.cat(outs, dim=0)


def _flex_varlen(q, k, v, window, bounds):
    bm = _document_block_mask(bounds, window, q.device)
    sl = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, total, Dh)
    return _flex_call(*sl, bm).squeeze(0).transpose(0, 1)


def _flash_varlen(q, k, v, window, cu, max_seqlen):
    _, varlen_fn = _flash_fns(q.device)
    cu = cu.to(device=q.device, dtype=torch.int32)
    return _first(varlen_fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                            max_seqlen_k=max_seqlen, causal=False, window_size=_flash_window(window)))


# ----------------------------------------------------------------------------- entry point


def _prepare(q, k, v, window, cu_seqlens, max_seqlen, needs_grad=None):
    """Validate a call and describe it; returns (_Call, window, bounds, max_seqlen)."""
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    bounds = None
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"dense attention takes (B, H, N, Dh) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)} (packed (total, H, Dh) tensors need cu_seqlens)"
            )
        nq, nk = q.shape[-2], k.shape[-2]
        window = _norm_window(window, max(nq, nk))
        if window is not None and nq != nk:
            raise ValueError(f"windowed attention needs as many queries as keys, got {nq} and {nk}")
        c = _Call(q.device.type, q.dtype, q.shape[-1], window, False, needs_grad,
                  cuda_capability=_capability(q.device))
        return c, window, bounds, None
    if q.dim() != 3 or q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"varlen attention takes packed (total, H, Dh) q, k, v of one shape, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of n + 1 offsets, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if max_seqlen is None:
        bounds = _bounds(cu_seqlens, q.shape[0])
        max_seqlen = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    max_seqlen = int(max_seqlen)
    window = _norm_window(window, max_seqlen)
    c = _Call(q.device.type, q.dtype, q.shape[-1], window, True, needs_grad,
              num_seqs=cu_seqlens.numel() - 1, cuda_capability=_capability(q.device))
    return c, window, bounds, max_seqlen


def resolve_backend(q, k, v, *, window=None, cu_seqlens=None, max_seqlen=None, backend=None, explain=False):
    """The backend that :func:`attention` would run for this call (no warnings). With
    ``explain``: (backend, [(backend passed over, why), ...])."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    c, *_ = _prepare(q, k, v, window, cu_seqlens, max_seqlen)
    name, skipped = _choose(backend or _backend, c, warn=False)
    return (name, skipped) if explain else name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v.

    Dense: q (B, H, Nq, Dh), k and v (B, H, Nk, Dh) -> (B, H, Nq, Dh).
    Varlen: q, k, v packed (total, H, Dh), ``cu_seqlens`` int32 (n + 1,) offsets of the n
    sequences (first 0, last total); each sequence attends only to itself -> (total, H, Dh).
    ``max_seqlen``: the longest sequence (computed from ``cu_seqlens`` when not given,
    which reads it on the host).
    ``window``: half width of a sliding window, query i sees key j when |i - j| <= window
    (positions within a sequence; ModernBERT's local attention of 128 tokens is
    ``window=64``); a window >= N - 1 is global attention.
    ``backend``: override the backend selected by :func:`set_backend` for this call.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    c, window, bounds, max_seqlen = _prepare(q, k, v, window, cu_seqlens, max_seqlen)
    name, _ = _choose(backend or _backend, c, warn=True)
    if not c.varlen:
        return _DENSE[name](q, k, v, window)
    if name == "flash":
        return _flash_varlen(q, k, v, window, cu_seqlens, max_seqlen)
    if bounds is None:
        bounds = _bounds(cu_seqlens, q.shape[0])
    if name == "flex":
        return _flex_varlen(q, k, v, window, bounds)
    if name == "sdpa":  # the math reference splits too, without a word: it is never meant to be fast
        _warn_once(("split", name),
                   f"ivfast attention: backend 'sdpa' has no varlen kernel; running the {c.num_seqs} packed "
                   f"sequences of a varlen call one by one (correct, not fast). (Shown once.)", stacklevel=3)
    return _varlen_split(name, q, k, v, window, bounds)


# ----------------------------------------------------------------------------- description


def describe_backend(device=None) -> str:
    """One line for the run log: the selected backend, what it resolves to for bf16
    dense / windowed / varlen calls on ``device`` (default: CUDA when available), and the
    flash-attn version if any."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cap = _capability(dev)
    name = _backend

    def pick(window, varlen):
        c = _Call(dev.type, torch.bfloat16, 64, window, varlen, needs_grad=True, cuda_capability=cap)
        chosen, _ = _choose(name, c, warn=False)
        if varlen and chosen in ("sdpa", "math"):
            chosen += " (split per sequence)"
        return chosen

    parts = [f"attention backend '{name}' on {dev.type}: dense -> {pick(None, False)}, "
             f"windowed -> {pick(64, False)}, varlen -> {pick(None, True)}"]
    if _flash_installed():
        info = flash_attn_info()
        if info["available"]:
            which = "FA3 flash_attn_interface" if info["fa3"] is not None and cap is not None and cap[0] == 9 else "flash_attn"
            parts.append(f"flash-attn {info['version']} ({which})")
        else:
            parts.append(f"flash-attn unusable ({info['error']})")
    else:
        parts.append("flash-attn not installed")
    parts.append(f"flex {'available' if flex_available() else 'unavailable'}")
    parts.append(f"torch {torch.__version__}")
    return "; ".join(parts)
