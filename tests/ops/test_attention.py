"""ivfast.ops.attention: every backend present here against the float64 attention (forward and q/k/v
gradients) under the rule of tests.support, PyTorch's own error being the same attention computed
in the inputs' dtype; windows, varlen, backend selection and the one-time fallback warnings."""
import math
import warnings

import pytest
import torch

from ivfast.ops import attention as A
from ivfast.ops.attention import AttentionFallbackWarning, attention
from tests.ops.common import check_op, close

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _flash_runs(device):
    return device == "cuda" and A._flash_reason(A._Call("cuda", torch.bfloat16, 64, None, False, True,
                                                        cuda_capability=A._capability(torch.device("cuda")))) is None


@pytest.fixture(autouse=True)
def _fresh():
    previous = A.set_backend("auto")
    A.reset_fallback_warnings()
    yield
    A.set_backend(previous)
    A.reset_fallback_warnings()


def reference(q, k, v, window=None):
    """An independent attention over (B, H, N, Dh), computed in q's dtype (float64 for the exact values)."""
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if window is not None:
        i = torch.arange(q.shape[-2], device=q.device)
        s = s.masked_fill((i[:, None] - i[None, :]).abs() > window, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


def qkv(b=2, h=3, n=37, d=16, dtype=torch.float32, device="cpu", grad=False, nk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, n, d), (b, h, nk or n, d), (b, h, nk or n, d)]
    out = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return [t.requires_grad_(grad) for t in out]


def f64(*ts):
    return [t.detach().double() for t in ts]


def backend_params():
    params = [pytest.param("math"), pytest.param("sdpa"), pytest.param("flex")]
    params.append(pytest.param("flash", marks=pytest.mark.skipif(
        not A._flash_installed() or not torch.cuda.is_available(),
        reason="flash-attn not installed here / no CUDA device (it does not install on this machine)")))
    return params


WINDOWS = [None, 0, 3, 36]  # 36 = N - 1: global


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("window", WINDOWS)
def test_math_matches_float64_reference(window):
    q, k, v = qkv()
    out = attention(q, k, v, window=window, backend="math")
    close(out, reference(*f64(q, k, v), window), reference(q, k, v, window))


def test_math_computes_in_float32_under_autocast():
    q, k, v = qkv(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend="math")
    assert out.dtype == torch.bfloat16
    close(out, reference(*f64(q, k, v)), reference(q, k, v))


@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_window_zero_is_identity_on_values(backend):
    q, k, v = qkv()
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, window=0, backend=backend), v)


# ----------------------------------------------------------------------------- backends vs math


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("backend", backend_params())
def test_forward_matches_math(backend, window, dtype, device):
    if backend == "flash" and (dtype == torch.float32 or not _flash_runs(device)):
        pytest.skip("flash-attn serves CUDA fp16/bf16 only")
    q, k, v = qkv(dtype=dtype, device=device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", AttentionFallbackWarning)  # no fallback: the backend itself runs
        assert A.resolve_backend(q, k, v, window=window, backend=backend) == backend
        out = attention(q, k, v, window=window, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    close(out, reference(*f64(q, k, v), window), reference(q, k, v, window), what=f"{backend} window {window}")


def _grads(backend, window, dtype, device, **kw):
    q, k, v = qkv(dtype=dtype, device=device, grad=True, **kw)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    out = attention(q, k, v, window=window, backend=backend)
    out.backward(g)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 0, 5, 100])
@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] != "math"] + ["math"])
def test_backward_matches_reference(backend, window, dtype, device):
    if backend == "flash" and (dtype == torch.float32 or not _flash_runs(device)):
        pytest.skip("flash-attn serves CUDA fp16/bf16 only")
    if backend == "flex" and device == "cpu":
        pytest.skip("FlexAttention has no CPU backward (the fallback is tested below)")
    check_op(lambda q, k, v: attention(q, k, v, window=window, backend=backend),
             lambda q, k, v: reference(q, k, v, window), qkv(dtype=dtype, device=device, grad=True),
             what=f"{backend} window {window}")


@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_cross_attention_single_query(backend):
    """The pooling heads attend one query over N keys."""
    q, k, v = qkv(n=1, nk=29)
    with torch.no_grad():
        out = attention(q, k, v, backend=backend)
    assert out.shape == (2, 3, 1, 16)
    close(out, reference(*f64(q, k, v)), reference(q, k, v))


# ----------------------------------------------------------------------------- varlen

LENGTHS = [5, 17, 9]


def packed(dtype=torch.float32, grad=False, h=3, d=16, lengths=LENGTHS):
    g = torch.Generator().manual_seed(2)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def per_sequence(q, k, v, cu, window):
    """The reference attention of each packed sequence on its own, in q's dtype."""
    outs = []
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        sl = [t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        outs.append(reference(*sl, A._norm_window(window, e - s))[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.filterwarnings("ignore::ivfast.ops.attention.AttentionFallbackWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 4, 16])  # 16: windowed for the 17-long sequence only
@pytest.mark.parametrize("backend", backend_params())
def test_varlen_matches_per_sequence(backend, window, dtype):
    if backend == "flash":
        pytest.skip("flash-attn varlen runs only on CUDA fp16/bf16")
    q, k, v, cu = packed(dtype)
    with torch.no_grad():
        out = attention(q, k, v, cu_seqlens=cu, window=window, backend=backend)
    assert out.shape == q.shape
    close(out, per_sequence(*f64(q, k, v), cu, window), per_sequence(q, k, v, cu, window), what=f"varlen {backend}")
    if dtype != torch.float32:
        return
    with torch.no_grad():
        out_given_max = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), window=window, backend=backend)
    torch.testing.assert_close(out_given_max, out)
    # the sequences do not see each other: changing one leaves the others alone
    q2 = q.clone()
    q2[:5] += 1.0
    k2, v2 = k.clone(), v.clone()
    k2[:5] += 1.0
    v2[:5] += 1.0
    with torch.no_grad():
        out2 = attention(q2, k2, v2, cu_seqlens=cu, window=window, backend=backend)
    torch.testing.assert_close(out2[5:], out[5:])


@pytest.mark.filterwarnings("ignore::ivfast.ops.attention.AttentionFallbackWarning")
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
def test_varlen_backward(backend, window):
    q, k, v, cu = packed(grad=True)
    check_op(lambda q, k, v: attention(q, k, v, cu_seqlens=cu, window=window, backend=backend),
             lambda q, k, v: per_sequence(q, k, v, cu, window), [q, k, v], what=f"varlen {backend}")


def test_varlen_with_an_empty_sequence():
    q, k, v, cu = packed(lengths=[4, 0, 7])
    with torch.no_grad():
        out = attention(q, k, v, cu_seqlens=cu, backend="math")
    close(out, per_sequence(*f64(q, k, v), cu, None), per_sequence(q, k, v, cu, None))


def test_varlen_split_warns_once_for_sdpa():
    q, k, v, cu = packed()
    with pytest.warns(AttentionFallbackWarning, match="no varlen kernel.*3 packed sequences"):
        attention(q, k, v, cu_seqlens=cu, backend="sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, cu_seqlens=cu, backend="sdpa")


# ----------------------------------------------------------------------------- fallbacks


def test_set_backend_flash_on_cpu_falls_back_with_one_warning():
    if torch.cuda.is_available() and A._flash_installed():
        pytest.skip("flash could serve CUDA calls here; this checks the CPU fallback only")
    A.set_backend("flash")  # never an error
    q, k, v = qkv()
    with pytest.warns(AttentionFallbackWarning) as rec:
        out = attention(q, k, v)
    msg = str(rec[0].message)
    assert "'flash'" in msg and "CUDA" in msg and "running 'sdpa'" in msg
    torch.testing.assert_close(out, attention(q, k, v, backend="math"), atol=2e-5, rtol=2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: silent
        attention(q, k, v)
        attention(q, k, v, window=3)
    # a different reason (another backend's) warns once again
    with pytest.warns(AttentionFallbackWarning, match="'flex'.*no backward on CPU"):
        attention(*qkv(grad=True), backend="flex")


def test_flex_backward_on_cpu_falls_back_to_sdpa_with_one_warning():
    A.set_backend("flex")
    with pytest.warns(AttentionFallbackWarning, match="'flex'.*no backward on CPU.*running 'sdpa'"):
        got = _grads("flex", 4, torch.float32, "cpu")
    ref = _grads("math", 4, torch.float32, "cpu")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _grads("flex", 4, torch.float32, "cpu")
    assert A.resolve_backend(*qkv(grad=True), window=4) == "sdpa"
    name, why = A.resolve_backend(*qkv(grad=True), window=4, explain=True)
    assert name == "sdpa" and why[0][0] == "flex" and "no backward on CPU" in why[0][1]
    with torch.no_grad():
        assert A.resolve_backend(*qkv(grad=True), window=4) == "flex"


def test_auto_never_picks_math_and_prefers_sdpa_on_cpu():
    A.set_backend("auto")
    for window in (None, 3):
        assert A.resolve_backend(*qkv(), window=window) == "sdpa"
    q, k, v, cu = packed()
    assert A.resolve_backend(q, k, v, cu_seqlens=cu) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(*qkv(), window=3)  # auto does not warn about what it did not pick


def test_set_backend_validates_and_use_backend_restores():
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.set_backend("xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(*qkv(), backend="fast")
    assert A.get_backend() == "auto"
    with A.use_backend("math"):
        assert A.get_backend() == "math"
        assert A.resolve_backend(*qkv()) == "math"
    assert A.get_backend() == "auto"
    assert A.set_backend("SDPA") == "auto" and A.get_backend() == "sdpa"


def test_describe_backend_is_one_line():
    for name in A.BACKENDS:
        A.set_backend(name)
        line = A.describe_backend()
        assert "\n" not in line and f"'{name}'" in line and "flash-attn" in line
    A.set_backend("auto")
    line = A.describe_backend("cpu")
    assert "dense -> sdpa" in line and ("not installed" in line or "flash-attn " in line)


# ----------------------------------------------------------------------------- errors and helpers


def test_bad_calls_raise():
    q, k, v = qkv(n=4, nk=9)
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(q, k, v, window=2)
    attention(q, k, v, window=50)  # a window covering everything is global: fine
    with pytest.raises(ValueError, match=">= 0"):
        attention(*qkv(), window=-1)
    with pytest.raises(ValueError, match="need cu_seqlens"):
        attention(*(t[0] for t in qkv()))
    q, k, v, cu = packed()
    with pytest.raises(ValueError, match="end at total"):
        attention(q, k, v, cu_seqlens=cu[:-1], backend="sdpa")
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        attention(q, k, v, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="only meaningful with cu_seqlens"):
        attention(*qkv(), max_seqlen=5)


def test_window_mask():
    m = A.window_mask(6, 1, "cpu")
    assert m.shape == (6, 6) and m.dtype == torch.bool
    assert m[2].tolist() == [False, True, True, True, False, False]


def test_block_masks_are_cached():
    if not A.flex_available():
        pytest.skip("no FlexAttention in this torch")
    a = A._sliding_block_mask(40, 3, torch.device("cpu"))
    assert A._sliding_block_mask(40, 3, torch.device("cpu")) is a
    assert A._sliding_block_mask(40, 4, torch.device("cpu")) is not a


# ----------------------------------------------------------------------------- flash calling convention


def _fake_flash_func(q, k, v, *, causal=False, window_size=(-1, -1), softmax_scale=None):
    """flash-attn's documented semantics on (B, N, H, Dh): key j is visible to query i when
    i - left <= j <= i + right (-1: unbounded)."""
    assert not causal and q.shape[1] == k.shape[1] or window_size == (-1, -1)
    b, n, h, d = q.shape
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(d)
    left, right = window_size
    i = torch.arange(n)[:, None]
    j = torch.arange(k.shape[1])[None, :]
    ok = torch.ones(n, k.shape[1], dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = s.masked_fill(~ok, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v.double()).to(q.dtype)


def _fake_flash_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                       window_size=(-1, -1)):
    assert cu_seqlens_q.dtype == torch.int32 and max_seqlen_q == max_seqlen_k
    b = cu_seqlens_q.tolist()
    outs = [_fake_flash_func(q[s:e][None], k[s:e][None], v[s:e][None], window_size=window_size)[0]
            for s, e in zip(b[:-1], b[1:])]
    return torch.cat(outs), None  # some versions return (out, lse)


@pytest.mark.parametrize("window", [None, 0, 3])
def test_flash_calling_convention(monkeypatch, window):
    """Layouts, window_size and keyword names handed to flash-attn (checked on the CPU against a
    stand-in with flash-attn's documented semantics; the real kernel needs CUDA)."""
    monkeypatch.setattr(A, "_flash_fns", lambda device: (_fake_flash_func, _fake_flash_varlen))
    q, k, v = qkv()
    torch.testing.assert_close(A._flash_dense(q, k, v, window), attention(q, k, v, window=window, backend="math"),
                               atol=1e-5, rtol=1e-5)
    q, k, v, cu = packed()
    torch.testing.assert_close(A._flash_varlen(q, k, v, window, cu, max(LENGTHS)),
                               per_sequence(q, k, v, cu, window), atol=1e-5, rtol=1e-5)


def _cuda_call(dtype=torch.bfloat16, head_dim=64, window=None, varlen=False, cap=(9, 0)):
    return A._Call("cuda", dtype, head_dim, window, varlen, needs_grad=True, cuda_capability=cap)


def test_selection_for_cuda_calls_without_flash(monkeypatch):
    """The choice logic for CUDA calls, checked without a GPU (flash-attn absent)."""
    monkeypatch.setattr(A, "_flash_installed", lambda: False)
    choose = lambda name, c: A._choose(name, c, warn=False)
    assert choose("auto", _cuda_call()) == ("sdpa", [("flash", "flash-attn is not installed")])
    assert choose("auto", _cuda_call(window=64))[0] == "flex"
    assert choose("auto", _cuda_call(varlen=True))[0] == "flex"
    assert choose("flash", _cuda_call(window=64, dtype=torch.float32))[0] == "flex"
    assert choose("flash", _cuda_call())[0] == "sdpa"
    name, why = choose("flash", _cuda_call(window=64, head_dim=8))
    assert name == "sdpa" and [b for b, _ in why] == ["flash", "flex"] and "head dim >= 16" in why[1][1]
    assert choose("math", _cuda_call())[0] == "math"


def test_selection_for_cuda_calls_with_flash(monkeypatch):
    fake = {"available": True, "version": "2.6.3", "fa2": object(), "fa3": None, "error": None}
    monkeypatch.setattr(A, "_flash_installed", lambda: True)
    monkeypatch.setattr(A, "flash_attn_info", lambda: fake)
    choose = lambda name, c: A._choose(name, c, warn=False)
    assert choose("auto", _cuda_call(window=64)) == ("flash", [])
    assert choose("auto", _cuda_call(varlen=True)) == ("flash", [])
    assert choose("auto", _cuda_call(dtype=torch.float32))[0] == "sdpa"
    assert choose("auto", _cuda_call(head_dim=320))[1] == [("flash", "flash-attn supports head dim <= 256, got 320")]
    assert "compute capability" in choose("flash", _cuda_call(cap=(7, 5)))[1][0][1]
    fake["version"] = "2.2.1"
    assert choose("auto", _cuda_call(window=64))[0] == "flex"
    assert choose("auto", _cuda_call())[0] == "flash"
    fake.update(fa2=None, fa3=object())
    assert choose("auto", _cuda_call(cap=(9, 0), window=64))[0] == "flash"
    assert choose("auto", _cuda_call(cap=(8, 0)))[0] == "sdpa"
