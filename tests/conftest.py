"""Test-session set-up.

Triton decides at import time whether it interprets kernels. On a machine without a GPU
the kernel tests run through the interpreter, so it is switched on here, before anything
imports triton. Subprocess training runs get a clean environment unless a test asks for it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_interprets() -> bool:
    """Triton picks interpreter or compiler when a @triton.jit function is defined, its own
    library (tl.zeros, ...) included: it must have been imported after TRITON_INTERPRET=1."""
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.zeros, InterpretedFunction)


def pytest_sessionstart(session):
    if os.environ.get("TRITON_INTERPRET") == "1" and not _triton_interprets():
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; kernel tests cannot run")


# Set by an in-process ``distributed.init`` earlier in the session (its store still holds
# MASTER_PORT): a training subprocess must pick its own rendezvous.
RENDEZVOUS_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "CROSS_RANK", "CROSS_SIZE"}


def run_env(interpret: bool = False, **extra) -> dict:
    """Environment for a training subprocess: the interpreter only when asked for, and no
    rendezvous variables inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS and k != "TRITON_INTERPRET"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update(extra)
    return env
