"""Launchers a cluster uses, simulated on the CPU (gloo on loopback), each against one process.

- srun: two plain ``python ivfast/train.py`` processes that carry only srun's variables
  (``SLURM_PROCID`` 0/1, ``SLURM_NTASKS=2``, ``SLURM_LOCALID``, the node list, the job id)
  form one job of two ranks; with MASTER_ADDR/PORT derived from the node list and job id, or
  set as an sbatch script would set them.
- torchrun with two "nodes" (``--nnodes 2``, ``--node_rank`` 0/1) inside a simulated Slurm
  job: torchrun's ranks are kept.
- SIGUSR1 (``sbatch --signal=USR1@120``): saves at the next step, exits 75, and the same
  command resumes at the right step.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import ROOT, free_port, run_env, train_args
from tests.support import step_metrics as metrics

STEPS = 4
COMMON = [f"train.max_steps={STEPS}", "model.encoder.drop_path=0.0", "deepspeed.zero_stage=1"]
COMPARED = ("loss", "loss_align_layers", "loss_align_final", "loss_recon", "grad_norm")
TIMEOUT = 300


def _free_port(lo, hi):
    """A free port in [lo, hi] (the range srun's derived ports come from)."""
    for port in range(lo + os.getpid() % (hi - lo), hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _wait_all(procs, what):
    """Wait for every process; on a failure or a timeout kill the rest and show their output."""
    deadline = time.time() + TIMEOUT
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.time()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{what}: timed out")
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"{what} [{i}] exit {rc}:\n{out[-2000:]}\n{err[-4000:]}"
    return results


def _lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def assert_same_losses(one, many):
    assert [r["step"] for r in one] == [r["step"] for r in many] == list(range(1, STEPS + 1))
    for a, b in zip(one, many):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the global batch (8) on its own."""
    out = str(tmp_path_factory.mktemp("one") / "run")
    proc = subprocess.Popen([sys.executable, *train_args(out, [*COMMON, "data.batch_size=8"])], cwd=ROOT,
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_all([proc], "one process")
    return metrics(out)


@pytest.mark.parametrize("rendezvous", ["derived", "sbatch"])
def test_srun_tasks_form_one_job_equal_to_one_process(tmp_path, one_process, rendezvous):
    """derived: MASTER_ADDR from the node list's first host, MASTER_PORT from the job id.
    sbatch: MASTER_ADDR/PORT exported by the batch script (they win over the derived ones)."""
    out = str(tmp_path / "srun")
    if rendezvous == "derived":
        port = _free_port(10000, 29999)
        job = {"SLURM_JOB_ID": str(7 * 20000 + port - 10000),  # 10000 + job id % 20000 == port
               "SLURM_JOB_NODELIST": "localhost,gpu[02-04]"}
    else:
        port = free_port()
        job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "nohost[1-2]",  # the exports win
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = []
    for rank in (0, 1):
        env = run_env(OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                      SLURM_STEP_ID="0", **job)
        procs.append(subprocess.Popen([sys.executable, *train_args(out, [*COMMON, "data.batch_size=4"])], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (_, _, err0), (_, _, err1) = _wait_all(procs, f"srun tasks ({rendezvous})")
    host = "localhost" if rendezvous == "derived" else "127.0.0.1"
    assert f"ivfast: srun: rank 0 of 2 (SLURM_PROCID, SLURM_NTASKS), local rank 0 (SLURM_LOCALID); " \
           f"rendezvous at {host}:{port}" in err0
    assert "ivfast: srun:" not in err1  # rank 0 reports for the job
    assert "on 2 x cpu" in err0  # one job of two ranks
    assert "global batch 8 (4 per rank x 2 ranks x 1 accumulation)" in err0
    assert_same_losses(one_process, metrics(out))


def test_torchrun_two_nodes_inside_a_slurm_job_keep_torchrun_ranks(tmp_path, one_process):
    """Two torchrun agents (``--nnodes 2``, one per "node") as ``srun --ntasks-per-node=1
    torchrun ...`` starts them: each carries srun's variables, yet the workers take torchrun's
    RANK/WORLD_SIZE (srun's mapping must not fire)."""
    out = str(tmp_path / "torchrun")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               *train_args(out, [*COMMON, "data.batch_size=4"])]
        env = run_env(OMP_NUM_THREADS="1", SLURM_PROCID=str(node), SLURM_LOCALID="0", SLURM_NTASKS="2",
                      SLURM_STEP_ID="0", SLURM_JOB_ID="99", SLURM_JOB_NODELIST="localhost,otherhost")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    (_, _, err0), _ = _wait_all(procs, "torchrun nodes")
    assert "ivfast: srun:" not in err0
    assert "on 2 x cpu" in err0
    assert_same_losses(one_process, metrics(out))


def test_sigusr1_saves_exits_75_and_the_same_command_resumes(tmp_path):
    out = str(tmp_path / "usr1")
    cmd = [sys.executable, *train_args(out, ["train.max_steps=40", "train.save_every=1000", "data.batch_size=2"])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if _lines(path) >= 2:  # two steps logged: the handlers are in place
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 75, err[-4000:]
    assert "SIGUSR1 received (Slurm's warning before the time limit" in err
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        tag = f.read().strip()
    stopped_at = int(tag.split("_")[1])
    assert 2 <= stopped_at < 40
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped_at + 1))
    assert f"stop requested: checkpoint saved at step {stopped_at}" in err

    # The requeued job runs the same command (here two more steps): it resumes where it stopped.
    cmd2 = [sys.executable, *train_args(out, [f"train.max_steps={stopped_at + 2}", "train.save_every=1000",
                                               "data.batch_size=2"])]
    again = subprocess.run(cmd2, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {tag} at step {stopped_at}" in again.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped_at + 3))


def test_several_tasks_without_a_rank_are_refused_in_one_line(tmp_path):
    """A ``salloc -n 2`` shell: SLURM_NTASKS=2 but no SLURM_PROCID (and no launcher's RANK)."""
    proc = subprocess.run([sys.executable, *train_args(str(tmp_path / "x"), [])], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=run_env(SLURM_NTASKS="2", SLURM_JOB_ID="5"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ivfast: SLURM_NTASKS=2 but this process has no rank"), proc.stderr
    assert not os.path.exists(tmp_path / "x")
