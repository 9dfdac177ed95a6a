"""Test-session set-up.

Triton decides at import time whether it interprets kernels. On a machine without a GPU
the kernel tests run through the interpreter, so it is switched on here, before anything
imports triton. Subprocess training runs get a clean environment unless a test asks for it.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # ``tests.support`` and the repository's packages
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A test session inside a Slurm job (srun pytest, an sbatch script) must not turn the in-process
# training runs into ranks of that job (ivfast.training.distributed reads srun's variables).
# Slurm's batch shell also sets ENVIRONMENT=BATCH, which launch_env reads.
for _name in [k for k in os.environ if k.startswith("SLURM_") or k == "ENVIRONMENT"]:
    del os.environ[_name]


def _triton_interprets() -> bool:
    """Triton picks interpreter or compiler when a @triton.jit function is defined, its own
    library (tl.zeros, ...) included: it must have been imported after TRITON_INTERPRET=1."""
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.zeros, InterpretedFunction)


def pytest_sessionstart(session):
    if os.environ.get("TRITON_INTERPRET") == "1" and not _triton_interprets():
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; kernel tests cannot run")


@pytest.fixture(autouse=True)
def _kernels_only_where_asked(request):
    """Outside tests/ops the Triton kernels (interpreted here: slow) are off unless a test is
    marked ``kernels``; the references compute the same functions."""
    from ivfast.ops import dispatch

    if request.node.get_closest_marker("kernels") or f"{os.sep}tests{os.sep}ops{os.sep}" in str(request.node.path):
        yield
        return
    with dispatch.override(fused=False):
        yield
