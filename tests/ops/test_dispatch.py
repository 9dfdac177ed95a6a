"""ivfast.ops.dispatch: the process-wide switches, which implementation serves a call (a CPU process
without TRITON_INTERPRET runs every reference and launches nothing), and ivfast.ops importing
nothing else of ivfast."""

import pytest
import torch

from ivfast.ops import dispatch
from tests.ops.common import compiled_python


def test_ops_import_nothing_else_of_ivfast():
    res = compiled_python(
        "import importlib, pkgutil, sys\n"
        "import ivfast.ops\n"
        "names = [m.name for m in pkgutil.iter_modules(ivfast.ops.__path__)]\n"
        "for n in names:\n"
        "    importlib.import_module('ivfast.ops.' + n)\n"
        "other = sorted(m for m in sys.modules if m.startswith('ivfast.') and not m.startswith('ivfast.ops'))\n"
        "print('modules', len(names), 'other', other)\n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "other []" in res.stdout and "modules 0" not in res.stdout, res.stdout


_REFERENCES_ONLY = r"""
import torch
import torch.nn.functional as F
from ivfast.ops import adaln, diffusion_noise as DN, dispatch, rmsnorm as R, timestep_embedding as TE
from ivfast.ops import token_gather as TG

class NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched")

for mod in (adaln, DN, R, TE, TG):
    for name in [n for n in vars(mod) if n.endswith("_kernel")]:
        setattr(mod, name, NoLaunch())
assert not dispatch.interpreting() and not dispatch.use_triton(torch.zeros(1))

def same(fn, ref, *args):
    a = [t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in args]
    b = [t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in args]
    out, want = fn(*a), ref(*b)
    assert torch.equal(out, want), fn
    if out.requires_grad:
        out.float().square().sum().backward()
        want.float().square().sum().backward()
        for u, v in zip(a, b):
            if torch.is_tensor(u) and u.requires_grad:
                assert torch.equal(u.grad, v.grad), fn

g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g).requires_grad_()
n = 16
same(adaln.adaln_block, adaln.adaln_block_ref, r(3, n), r(3, n), r(3 * n, n), r(3 * n), r(n), r(n), r(n, n), r(n),
     r(n, n), r(n), 1e-6)
same(adaln.adaln_final, adaln.adaln_final_ref, r(3, n), r(3, n), r(2 * n, n), r(2 * n), r(5, n), r(5), 1e-6)
same(R.rmsnorm, R.rmsnorm_ref, r(4, n), r(n), 1e-6)
same(TE.timestep_embedding, TE.timestep_embedding_ref, torch.arange(7), 16)
idx = torch.tensor([[0, 3, 5], [1, 2, 7]])
same(TG.add_pos_at, TG.add_pos_at_ref, r(2, 3, n), idx, r(8, n))
same(TG.add_pos_at, TG.add_pos_at_ref, r(2, 3, n), idx, None, (2, 2, 2))
same(TG.scatter_with_mask_token, TG.scatter_with_mask_token_ref, r(2, 3, n), idx, r(n), r(8, n))
seeds = DN.row_seeds(torch.tensor([1, 2]), 3)
tab = torch.linspace(1, 0, 10, dtype=torch.float64)
same(DN.q_sample, DN.q_sample_reference, r(6, 5), torch.arange(6), seeds, tab, tab.flip(0))
same(DN.eps_mse, DN.eps_mse_reference, r(6, 5), seeds)
print("ok")
"""


def test_cpu_without_interpreter_runs_every_reference():
    """Without TRITON_INTERPRET, CPU tensors take the references of every op, forward and backward."""
    res = compiled_python(_REFERENCES_ONLY)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_configure_and_override():
    fused, lean = dispatch.fused_enabled(), dispatch.lean_enabled()
    with dispatch.override(fused=not fused):
        assert dispatch.fused_enabled() is (not fused) and dispatch.lean_enabled() is lean
        dispatch.configure(lean=not lean)  # set inside the block: restored with it
        assert dispatch.lean_enabled() is (not lean)
    assert (dispatch.fused_enabled(), dispatch.lean_enabled()) == (fused, lean)
    with pytest.raises(RuntimeError), dispatch.override(fused=False, lean=False):
        raise RuntimeError("the switches come back after an error too")
    assert (dispatch.fused_enabled(), dispatch.lean_enabled()) == (fused, lean)
    dispatch.configure()  # None leaves both as they are
    assert (dispatch.fused_enabled(), dispatch.lean_enabled()) == (fused, lean)


def test_use_triton_and_lean_applies(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.interpreting() and dispatch.use_triton(cpu)  # the interpreter serves CPU tensors
    with dispatch.override(fused=False):
        assert not dispatch.use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.use_triton(cpu)
    x = torch.zeros(2, requires_grad=True)
    assert dispatch.lean_applies(x)
    with dispatch.override(lean=False):
        assert not dispatch.lean_applies(x)
    with torch.no_grad():
        assert not dispatch.lean_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dispatch.lean_applies(x)


def test_kernels_switch_follows_ivfast_kernels_at_import():
    res = compiled_python("from ivfast.ops import dispatch; print(dispatch.fused_enabled(), dispatch.lean_enabled())",
                     IVFAST_KERNELS="0")
    assert res.returncode == 0 and res.stdout.split() == ["False", "True"], res.stderr[-2000:]
