"""Process-group set-up for one process, the DeepSpeed launcher, torchrun or mp.spawn; CPU or GPU.

Also the CUDA caching allocator's settings (``train.allocator``), which must be in the
environment before CUDA starts: :func:`configure_allocator`, called by ``ivfast/train.py``.
"""
from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
# torch also reads this device-generic name, and prefers it when both are set.
ALLOC_ENV_GENERIC = "PYTORCH_ALLOC_CONF"


def configure_allocator(conf: str, environ=None) -> str:
    """Put ``conf`` (``train.allocator``) into ``PYTORCH_CUDA_ALLOC_CONF`` unless the
    environment already sets the allocator; returns one line for the log ("" if nothing is set).

    Has an effect only before CUDA is initialised (torch reads the variable once).
    ``environ``: the mapping to use (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    given = [(k, env[k]) for k in (ALLOC_ENV_GENERIC, ALLOC_ENV) if env.get(k)]
    if given:
        name, value = given[0]
        if conf and value != conf:
            return f"allocator: {name}={value} from the environment wins over train.allocator={conf}"
        return f"allocator: {name}={value} (from the environment)"
    if not conf:
        return ""
    env[ALLOC_ENV] = conf
    late = " -- too late for this process: CUDA is already initialised" if torch.cuda.is_initialized() else ""
    return f"allocator: {ALLOC_ENV}={conf} (train.allocator){late}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return requested


def init(device_kind: str, cpu_shm: bool = False) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU).

    Without a launcher (plain ``python ivfast/train.py``) this is a world of one process.
    On CPU, DeepSpeed's shared-memory all-reduce extension is compiled on first use (~45 s);
    it is skipped unless ``cpu_shm`` is set, and gloo does the reductions.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if device_kind == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device_kind == "cpu" and not cpu_shm:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
