"""srun's variables -> ranks and rendezvous (pure functions), and the stop signals."""
import os
import signal

import pytest

from ivfast.training.distributed import (
    PORT_BASE,
    PORT_SPAN,
    LaunchError,
    apply_launch_env,
    expand_nodelist,
    launch_env,
    slurm_port,
)


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("127.0.0.1", ["127.0.0.1"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("a-[1-2],b3", ["a-1", "a-2", "b3"]),
    ("node[001-003]x", ["node001x", "node002x", "node003x"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: width of the first bound
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # the last group varies fastest
    ("rack[1-2]-gpu[07,09]-ib", ["rack1-gpu07-ib", "rack1-gpu09-ib", "rack2-gpu07-ib", "rack2-gpu09-ib"]),
    ("x[3],y,z[5-6,9]", ["x3", "y", "z5", "z6", "z9"]),
    ("[1-2]", ["1", "2"]),
    ("dgx-a100-[1-2].cluster", ["dgx-a100-1.cluster", "dgx-a100-2.cluster"]),
    (" gpu[1-2] ", ["gpu1", "gpu2"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, why", [
    ("", "empty"),
    ("a[1-2", "'[' without ']'"),
    ("a]1", "']' without '['"),
    ("a[[1]]", "nested"),
    ("a[2-1]", "backwards"),
    ("a[x]", "bad range"),
    ("a[1-]", "bad range"),
    ("a[]", "bad range"),
    ("a[1,,2]", "bad range"),
    ("a,,b", "empty host name"),
    ("a,", "empty host name"),
    ("a[0-99999999]", "more than"),
])
def test_malformed_nodelists_are_refused(nodelist, why):
    with pytest.raises(ValueError) as e:
        expand_nodelist(nodelist)
    assert why in str(e.value)


def test_port_from_the_job_id_is_deterministic_and_unprivileged():
    assert (PORT_BASE, PORT_SPAN) == (10000, 20000)
    assert slurm_port("0") == 10000 and slurm_port("19999") == 29999 and slurm_port("20000") == 10000
    assert slurm_port("123456") == slurm_port("123456") == 13456
    assert all(1024 < slurm_port(str(j)) < 32768 for j in range(0, 200000, 997))  # below the ephemeral range
    with pytest.raises(ValueError, match="not a number"):
        slurm_port("12_3")


SRUN = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123456"}


def test_srun_task_maps_to_rank_local_rank_world_and_rendezvous():
    add, note = launch_env(SRUN)
    assert add == {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03", "MASTER_PORT": "13456"}
    assert note.startswith("srun: rank 1 of 8 (SLURM_PROCID, SLURM_NTASKS), local rank 1 (SLURM_LOCALID); "
                           "rendezvous at gpu03:13456") and "warning" not in note and "\n" not in note


def test_exported_master_addr_and_port_win():
    add, note = launch_env({**SRUN, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"})
    assert add == {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert "rendezvous at 10.0.0.5:29500 (MASTER_ADDR from the environment; MASTER_PORT from the environment)" in note


@pytest.mark.parametrize("extra, addr", [
    ({"SLURM_STEP_NODELIST": "gpu[04]"}, "gpu04"),  # the step's nodes come first (srun -N 1 in a bigger job)
    ({"SLURM_JOB_NODELIST": "", "SLURM_NODELIST": "old[7-8]"}, "old7"),  # the older name
])
def test_nodelist_precedence(extra, addr):
    assert launch_env({**SRUN, **extra})[0]["MASTER_ADDR"] == addr


def test_task_count_precedence_and_legacy_names():
    # An interactive step inside a bigger allocation: the step has one task.
    assert launch_env({**SRUN, "SLURM_STEP_NUM_TASKS": "1"}) == ({}, "")
    assert launch_env({**SRUN, "SLURM_STEP_NUM_TASKS": "2"})[0]["WORLD_SIZE"] == "2"
    legacy = {k: v for k, v in SRUN.items() if k not in ("SLURM_NTASKS", "SLURM_JOB_ID")}
    add, _ = launch_env({**legacy, "SLURM_NPROCS": "4", "SLURM_JOBID": "20001"})
    assert (add["WORLD_SIZE"], add["MASTER_PORT"]) == ("4", "10001")


@pytest.mark.parametrize("env", [
    {},  # no Slurm
    {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[1-2]"},  # a salloc shell without -n
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"},  # a salloc shell with one task
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"},
    {**SRUN, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"},  # torchrun/deepspeed inside the job
    {"RANK": "0", "SLURM_NTASKS": "8"},  # a launcher's RANK, no SLURM_PROCID: no refusal
])
def test_one_process_or_a_launcher_is_left_alone(env):
    assert launch_env(env) == ({}, "")


@pytest.mark.parametrize("env, message", [
    ({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"},
     ("SLURM_NTASKS=2 but this process has no rank (neither RANK nor SLURM_PROCID is set): start one process per "
      "task with srun, or use a launcher (deepspeed, torchrun); for a single process, unset SLURM_NTASKS")),
    ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not a rank of SLURM_NTASKS=8"),
    ({**SRUN, "SLURM_PROCID": "one"}, "SLURM_PROCID='one' is not an integer"),
    ({**SRUN, "SLURM_NTASKS": "2x"}, "SLURM_NTASKS='2x' is not an integer"),
    ({**SRUN, "SLURM_LOCALID": ""}, "SLURM_PROCID=1 of SLURM_NTASKS=8 but SLURM_LOCALID is not set"),
    ({**SRUN, "SLURM_JOB_NODELIST": ""}, "srun task 1 of 8: set MASTER_ADDR or SLURM_JOB_NODELIST"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu[03-"}, "SLURM_JOB_NODELIST: nodelist 'gpu[03-': '[' without ']'"),
    ({**SRUN, "SLURM_JOB_ID": ""}, "srun task 1 of 8: set MASTER_PORT or SLURM_JOB_ID"),
])
def test_refusals_are_one_line(env, message):
    with pytest.raises(LaunchError) as e:
        launch_env(env)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_batch_script_itself_is_no_task():
    """Slurm's batch shell carries SLURM_PROCID=0, SLURM_LOCALID=0, the job's SLURM_NTASKS and
    ENVIRONMENT=BATCH, but no SLURM_STEP_ID: ``python ivfast/train.py`` there would wait forever
    for the other ranks. The tasks srun starts from it inherit ENVIRONMENT=BATCH and have a step."""
    batch = {**{k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "ENVIRONMENT": "BATCH"}
    with pytest.raises(LaunchError) as e:
        launch_env(batch)
    assert str(e.value) == ("SLURM_NTASKS=8 but this is the batch script itself (ENVIRONMENT=BATCH, no "
                            "SLURM_STEP_ID), not one of the job's tasks: start the training with srun (one task "
                            "per GPU) or a launcher (deepspeed, torchrun)")
    assert launch_env({**batch, "SLURM_NTASKS": "1"}) == ({}, "")  # a one-task job: one process
    assert launch_env({**batch, "SLURM_STEP_ID": "0"})[0]["RANK"] == "0"  # srun's task 0
    assert launch_env({**batch, "SLURM_STEPID": "3"})[0]["RANK"] == "0"  # the older name


def test_a_procid_without_a_step_is_used_with_a_warning():
    """srun's variables set by hand (no SLURM_STEP_ID, not the batch script): taken, with a warning."""
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    add, note = launch_env(env)
    assert add["RANK"] == "1"
    assert "warning: SLURM_STEP_ID is not set" in note and "start the training with srun" in note


def test_apply_updates_the_given_environment_only():
    env = dict(SRUN)
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    note = apply_launch_env(env)
    assert env["RANK"] == "1" and env["MASTER_ADDR"] == "gpu03" and note.startswith("srun: rank 1 of 8")
    assert {k: os.environ.get(k) for k in before} == before
    assert apply_launch_env(env) == ""  # RANK is set now: nothing more to do


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_sigusr1_requests_a_requeue_stop_and_a_repeat_changes_nothing(restore_handlers, caplog):
    from ivfast.training.trainer import StopRequested

    stop = StopRequested()
    assert not stop.flag and StopRequested.received is None
    with caplog.at_level("WARNING", logger="ivfast.train"):
        signal.raise_signal(signal.SIGUSR1)
    assert stop.flag and StopRequested.received == signal.SIGUSR1 in StopRequested.REQUEUE_SIGNALS
    assert StopRequested.REQUEUE_EXIT == 75
    assert "SIGUSR1 received (Slurm's warning before the time limit (sbatch --signal=USR1@...)): saving a " \
           "checkpoint at the next step boundary, then exit 75 so that the job is requeued and resumes" in caplog.text
    signal.raise_signal(signal.SIGUSR1)  # Slurm's warning again: still saving, no abort
    with pytest.raises(KeyboardInterrupt):  # SIGTERM after it (the time limit): give up at once
        signal.raise_signal(signal.SIGTERM)
    assert StopRequested.received == signal.SIGUSR1


def test_sigterm_stop_is_not_a_requeue_and_a_new_run_forgets_the_old_signal(restore_handlers, caplog):
    from ivfast.training.trainer import StopRequested

    StopRequested().flag = True
    StopRequested.received = signal.SIGUSR1
    stop = StopRequested(announce=False)  # a later run in the same process; not rank 0
    assert StopRequested.received is None
    signal.raise_signal(signal.SIGTERM)
    assert stop.flag and StopRequested.received == signal.SIGTERM not in StopRequested.REQUEUE_SIGNALS
    assert "received" not in caplog.text
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
