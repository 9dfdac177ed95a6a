"""Process-group set-up for one process, the DeepSpeed launcher, torchrun, mp.spawn or srun; CPU or GPU.

Who sets the ranks (:func:`launch_env`, applied by :func:`apply_launch_env`):

- ``RANK`` set: a launcher's ranks (deepspeed, torchrun, mp.spawn), even inside a Slurm job.
- otherwise, one task of several under ``srun`` (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``,
  else ``SLURM_NPROCS`` > 1): ``RANK`` <- ``SLURM_PROCID``, ``LOCAL_RANK`` <- ``SLURM_LOCALID``,
  ``WORLD_SIZE`` <- the task count; ``MASTER_ADDR`` (unless set) <- the first host of
  ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST`` (the compressed form
  expanded here, no ``scontrol``); ``MASTER_PORT`` (unless set) <- :func:`slurm_port` of
  ``SLURM_JOB_ID``. Several tasks but no rank, i.e. no ``SLURM_PROCID`` (a ``salloc -n N``
  shell) or the batch script itself (``ENVIRONMENT=BATCH`` without ``SLURM_STEP_ID``: its
  ``SLURM_PROCID=0`` is not a task's), is refused with a one-line :class:`LaunchError`.
- otherwise (no Slurm, an interactive shell, a single srun task): a world of one process.

Also the CUDA caching allocator's settings (``train.allocator``), which must be in the
environment before CUDA starts: :func:`configure_allocator`, called by ``ivfast/train.py``.
"""
from __future__ import annotations

import importlib
import itertools
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


class LaunchError(RuntimeError):
    """The environment names a launch this process cannot join; the message is one line."""


# MASTER_PORT derived from the Slurm job id: PORT_BASE + job id % PORT_SPAN, i.e. 10000-29999:
# no privileged port (< 1024), and below Linux's ephemeral range (32768-60999) from which
# outgoing connections take their ports. Two jobs sharing a node collide only when their ids
# differ by a multiple of 20000; set MASTER_PORT to choose another.
PORT_BASE = 10000
PORT_SPAN = 20000
MAX_HOSTS = 1_000_000  # a nodelist that expands to more is an error, not a memory blow-up

SLURM_TASK_COUNT_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
SLURM_JOB_ID_VARS = ("SLURM_JOB_ID", "SLURM_JOBID")


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets; check that brackets pair up and do not nest."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise ValueError(f"nodelist {text!r}: nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"nodelist {text!r}: ']' without '['")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"nodelist {text!r}: '[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, text: str) -> list[str]:
    """``01-04,07`` -> 01 02 03 04 07: each number keeps the width of the range's first bound."""
    out: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"nodelist {text!r}: bad range {part!r} in [{body}]")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"nodelist {text!r}: range {part!r} runs backwards")
        if len(out) + b - a + 1 > MAX_HOSTS:
            raise ValueError(f"nodelist {text!r}: more than {MAX_HOSTS} hosts")
        out.extend(str(n).zfill(len(lo)) for n in range(a, b + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded in Slurm's order without ``scontrol``.

    ``gpu[01-04,07]`` -> gpu01 gpu02 gpu03 gpu04 gpu07; ``a-[1-2],b3`` -> a-1 a-2 b3;
    ``node[001-003]x`` -> node001x node002x node003x; several bracket groups in one name
    (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2) vary the last group fastest. Zero padding
    follows the first bound of each range. Raises ``ValueError`` on a malformed list.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("nodelist is empty")
    hosts: list[str] = []
    for item in _split_top_level(text):
        if not item:
            raise ValueError(f"nodelist {text!r}: empty host name")
        pieces: list[list[str]] = []  # literals and bracket groups, in order
        rest = item
        while rest:
            head, bracket, tail = rest.partition("[")
            if head:
                pieces.append([head])
            if not bracket:
                break
            body, _, rest = tail.partition("]")
            pieces.append(_expand_range_set(body, text))
        count = 1
        for p in pieces:
            count *= len(p)
        if len(hosts) + count > MAX_HOSTS:
            raise ValueError(f"nodelist {text!r}: more than {MAX_HOSTS} hosts")
        hosts.extend("".join(combo) for combo in itertools.product(*pieces))
    return hosts


def slurm_port(job_id: str) -> int:
    """MASTER_PORT for a Slurm job: ``PORT_BASE + job_id % PORT_SPAN`` (10000-29999)."""
    if not str(job_id).strip().isdigit():
        raise ValueError(f"Slurm job id {job_id!r} is not a number")
    return PORT_BASE + int(job_id) % PORT_SPAN


def _first_set(environ, names) -> tuple[str, str] | tuple[None, None]:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None, None


def _int_var(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def launch_env(environ) -> tuple[dict[str, str], str]:
    """The variables to add before the process group starts, and one line for rank 0's log.

    ``({}, "")`` when ``RANK`` is set (a launcher's ranks win, also inside a Slurm job) or when
    the environment names one process (no Slurm, a ``salloc`` shell, a single ``srun`` task).
    For one of several ``srun`` tasks: the mapping in this module's docstring. Raises
    :class:`LaunchError` (one line) when several tasks are announced but no rank can be found,
    or a Slurm variable is malformed. Pure: reads ``environ``, changes nothing.
    """
    if environ.get("RANK", "").strip():
        return {}, ""
    count_var, count = _first_set(environ, SLURM_TASK_COUNT_VARS)
    world = _int_var(count_var, count) if count_var else 1
    if world <= 1:
        return {}, ""
    in_step = any(environ.get(v, "").strip() for v in ("SLURM_STEP_ID", "SLURM_STEPID"))  # srun sets them
    if environ.get("ENVIRONMENT", "") == "BATCH" and not in_step:  # its SLURM_PROCID=0 is no rank
        raise LaunchError(
            f"{count_var}={world} but this is the batch script itself (ENVIRONMENT=BATCH, no SLURM_STEP_ID), "
            f"not one of the job's tasks: start the training with srun (one task per GPU) or a launcher "
            f"(deepspeed, torchrun)")
    procid = environ.get("SLURM_PROCID", "").strip()
    if not procid:
        raise LaunchError(
            f"{count_var}={world} but this process has no rank (neither RANK nor SLURM_PROCID is set): "
            f"start one process per task with srun, or use a launcher (deepspeed, torchrun); "
            f"for a single process, unset {count_var}")
    rank = _int_var("SLURM_PROCID", procid)
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is not a rank of {count_var}={world}")
    localid = environ.get("SLURM_LOCALID", "").strip()
    if not localid:
        raise LaunchError(f"SLURM_PROCID={rank} of {count_var}={world} but SLURM_LOCALID is not set")
    local_rank = _int_var("SLURM_LOCALID", localid)
    if local_rank < 0:
        raise LaunchError(f"SLURM_LOCALID={local_rank} is negative")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)}
    where = []
    addr = environ.get("MASTER_ADDR", "").strip()
    if addr:
        where.append("MASTER_ADDR from the environment")
    else:
        list_var, nodelist = _first_set(environ, SLURM_NODELIST_VARS)
        if not list_var:
            raise LaunchError(f"srun task {rank} of {world}: set MASTER_ADDR or SLURM_JOB_NODELIST "
                              f"(rank 0's host) to rendezvous")
        try:
            addr = expand_nodelist(nodelist)[0]
        except ValueError as e:
            raise LaunchError(f"{list_var}: {e}") from None
        out["MASTER_ADDR"] = addr
        where.append(f"MASTER_ADDR: the first host of {list_var}={nodelist}")
    port = environ.get("MASTER_PORT", "").strip()
    if port:
        where.append("MASTER_PORT from the environment")
    else:
        id_var, job_id = _first_set(environ, SLURM_JOB_ID_VARS)
        if not id_var:
            raise LaunchError(f"srun task {rank} of {world}: set MASTER_PORT or SLURM_JOB_ID to rendezvous")
        try:
            port = str(slurm_port(job_id))
        except ValueError as e:
            raise LaunchError(f"{id_var}: {e}") from None
        out["MASTER_PORT"] = port
        where.append(f"MASTER_PORT: {PORT_BASE} + {id_var} % {PORT_SPAN}")
    note = (f"srun: rank {rank} of {world} (SLURM_PROCID, {count_var}), local rank {local_rank} (SLURM_LOCALID); "
            f"rendezvous at {addr}:{port} ({'; '.join(where)})")
    if not in_step:
        note += ("; warning: SLURM_STEP_ID is not set, so this may be no srun task: "
                 "start the training with srun, one task per GPU")
    return out, note


def apply_launch_env(environ=None) -> str:
    """Put :func:`launch_env`'s variables into ``environ`` (default ``os.environ``); returns its
    log line ("" when nothing was added). Raises :class:`LaunchError`."""
    env = os.environ if environ is None else environ
    add, note = launch_env(env)
    env.update(add)
    return note


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

    Without a launcher (plain ``python ivfast/train.py``) this is a world of one process; srun's
    variables make it one task of several (:func:`launch_env`; ``ivfast/train.py`` applies them
    earlier, to report a :class:`LaunchError` in one line). On CPU, DeepSpeed's shared-memory
    all-reduce extension is compiled on first use (~45 s); it is skipped unless ``cpu_shm`` is
    set, and gloo does the reductions.
    """
    apply_launch_env()
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
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            if visible != 1:
                raise LaunchError(f"local rank {local_rank} but {visible} CUDA devices are visible")
            # srun --gpus-per-task=1 / --gpu-bind: each task sees its own GPU as device 0.
            local_rank = 0
            os.environ["LOCAL_RANK"] = "0"
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
