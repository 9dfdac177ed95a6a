"""End-to-end Stage-1 training on the CPU: the tiny config through the real entry point.

Runs go through ``python ivfast/train.py`` (one process) or the ``deepspeed`` launcher
(two gloo ranks), exactly as a user runs them.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.support import FAST, ROOT, TINY, free_port, run_env, run_train, train_cmd
from tests.support import step_metrics as metrics

@pytest.mark.parametrize("recon", ["none", "linear", "diffusion"])
def test_each_variant_trains_20_steps_and_its_loss_falls(tmp_path, recon):
    out = str(tmp_path / recon)
    run_train(out, [f"model.recon={recon}", "train.max_steps=20", "train.save_every=10"])
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 21))
    first, last = [r["loss"] for r in recs[:5]], [r["loss"] for r in recs[-5:]]
    assert sum(last) / 5 < 0.8 * sum(first) / 5, [r["loss"] for r in recs]
    required = {"step", "loss", "loss_align_layers", "loss_align_final", "lr", "grad_norm", "step_time",
                "data_time", "clips_per_s", "skipped_steps", "peak_mem_mb"}
    if recon != "none":
        required.add("loss_recon")
    assert required <= set(recs[0]), set(recs[0])
    assert all(r["skipped_steps"] == 0 and r["grad_norm"] > 0 for r in recs)
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_00000020"


# Persistence threshold 0: ZeRO-3 partitions every parameter, even the tiny model's small ones.
TWO_RANK_COMMON = ["train.max_steps=6", "model.encoder.drop_path=0.0", "deepspeed.param_persistence_threshold=0"]


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory):
    """The metrics of the one-rank ZeRO-1 run (batch 8) every two-rank run is compared with."""
    out = str(tmp_path_factory.mktemp("one_rank"))
    run_train(out, [*TWO_RANK_COMMON, "data.batch_size=8", "deepspeed.zero_stage=1"])
    return metrics(out)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_match_one_rank(tmp_path, one_rank_reference, zero):
    run_train(str(tmp_path / "two"), [*TWO_RANK_COMMON, "data.batch_size=4", f"deepspeed.zero_stage={zero}"], nproc=2)
    one, two = one_rank_reference, metrics(str(tmp_path / "two"))
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        for key in ("loss", "loss_align_layers", "loss_align_final", "loss_recon", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])
        assert b["clips_per_s"] > 0
    # Resume the 2-rank ZeRO run (safe weights-only loading of its partitioned states) and go on.
    run_train(str(tmp_path / "two"), [*TWO_RANK_COMMON, "train.max_steps=8", "data.batch_size=4",
                                       f"deepspeed.zero_stage={zero}"], nproc=2)
    assert [r["step"] for r in metrics(str(tmp_path / "two"))] == list(range(1, 9))


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    overrides = ["train.max_steps=16", "train.save_every=4"]
    straight = str(tmp_path / "straight")
    run_train(straight, overrides)

    killed = str(tmp_path / "killed")
    env = run_env()
    proc = subprocess.Popen(train_cmd(killed, overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    path = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    with open(os.path.join(killed, "checkpoints", "latest")) as f:
        assert f.read().strip() in {"step_00000008", "step_00000012"}

    run_train(killed, overrides)  # the same command again: resumes
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 17))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_align_layers", "loss_recon", "lr", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (key, ra["step"])


def test_nonfinite_loss_everywhere_stops_after_a_bounded_number_of_skips(tmp_path):
    out = str(tmp_path / "nan")
    proc = subprocess.run(train_cmd(out, ["model.loss_weights=[1.0, 1.0, .nan]", "train.max_steps=5"]),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=run_env())
    assert proc.returncode != 0
    assert "50 consecutive steps skipped (a non-finite loss); stopping" in proc.stderr


class _PoisonOne(torch.utils.data.Dataset):
    """Wraps a dataset; one index yields a video of NaNs (its rank's loss becomes NaN)."""

    def __init__(self, base, index):
        self.base, self.index = base, index

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        item = self.base[key]
        if key[0] == self.index:
            item["video"] = torch.full_like(item["video"], float("nan"))
        return item


def _nan_worker(rank, world, out, port, index):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from ivfast.config import load_config
    from ivfast.training import trainer

    real = trainer.build_dataset
    trainer.build_dataset = lambda cfg: _PoisonOne(real(cfg), index)
    cfg = load_config(TINY, [f"output_dir={out}", *FAST, "train.max_steps=5", "data.batch_size=4",
                             "deepspeed.zero_stage=2"])
    trainer.train(cfg)


def test_nan_on_one_rank_is_skipped_on_all_ranks(tmp_path):
    from ivfast.data.loader import ShardedBatchSampler

    # The first sample of rank 1's half of global batch 2 (the third step) gives NaN on rank 1 only.
    order = ShardedBatchSampler(256, 4, 1, 2, seed=0).epoch_order(0)
    index = int(order[2 * 8 + 4])
    out = str(tmp_path / "nan1")
    torch.multiprocessing.spawn(_nan_worker, args=(2, out, free_port(), index), nprocs=2, join=True)
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]  # the skipped batch is not a step
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in recs)  # every logged loss is finite


def test_cli_reports_a_bad_config_in_one_line():
    proc = subprocess.run([sys.executable, "ivfast/train.py", "--config", TINY, "model.mask_ratio=1.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=run_env())
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: model.mask_ratio = 1.5: must be in (0, 1)"


def _make_list(tmp_path, n_good, n_bad):
    import numpy as np

    from tests.clips import write_corrupt, write_video

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_good):
        frames = rng.integers(0, 256, (10, 72, 96, 3), dtype=np.uint8)
        write_video(str(tmp_path / f"good{i}.mp4"), frames)
        lines.append(f"good{i}.mp4 {i % 3}")
    for i in range(n_bad):
        write_corrupt(str(tmp_path / f"bad{i}.mp4"), seed=i)
        lines.append(f"bad{i}.mp4 0")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return ["data.source=list", f"data.list_file={tmp_path / 'train.txt'}", f"data.root={tmp_path}"]


def test_pyav_list_training_skips_and_counts_unreadable_videos(tmp_path):
    data = _make_list(tmp_path, n_good=14, n_bad=2)
    out = str(tmp_path / "run")
    proc = run_train(out, [*data, "train.max_steps=4", "data.batch_size=4", "data.max_bad_fraction=0.5"])
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # one epoch of 16 samples: both bad files were met
    assert recs[-1]["bad_videos"] == 2
    assert "bad0.mp4" in proc.stderr and "bad1.mp4" in proc.stderr


def test_a_batch_of_mostly_unreadable_videos_stops_the_run(tmp_path):
    data = _make_list(tmp_path, n_good=2, n_bad=6)
    proc = subprocess.run(train_cmd(str(tmp_path / "run"), [*data, "train.max_steps=2", "data.batch_size=8"]),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=run_env())
    assert proc.returncode != 0
    assert "6 of 8 videos in this batch could not be read (more than data.max_bad_fraction = 0.5)" in proc.stderr


@pytest.mark.parametrize("learnable", [True, False], ids=["pos-table", "pos-in-kernel"])
def test_kernels_through_the_interpreter_match_the_reference_run(tmp_path, learnable):
    """Every fused kernel on (gather, scatter, Philox q_sample + MSE, timestep embedding, adaLN head)
    vs all references; fixed positions exercise the in-kernel sine-cosine."""
    common = ["train.max_steps=3", "data.batch_size=2", f"model.encoder.pos_learnable={str(learnable).lower()}"]
    run_train(str(tmp_path / "ref"), [*common, "model.fused_kernels=false"])
    run_train(str(tmp_path / "fused"), [*common, "model.fused_kernels=true"], interpret=True)
    ref, fused = metrics(str(tmp_path / "ref")), metrics(str(tmp_path / "fused"))
    assert len(ref) == len(fused) == 3
    for a, b in zip(ref, fused):
        for key in ("loss", "loss_align_layers", "loss_align_final", "loss_recon", "diff_mse", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])


def test_stage1_checkpoint_then_stage2_trains_and_its_loss_falls(tmp_path):
    s1 = str(tmp_path / "s1")
    run_train(s1, ["train.max_steps=10"])
    s2 = str(tmp_path / "s2")
    run_train(s2, [f"model.stage2.init_checkpoint={s1}/checkpoints", "train.max_steps=20", "train.lr=5e-4"],
              config=os.path.join(ROOT, "configs", "stage2_tiny.yaml"))
    recs = metrics(s2)
    assert [r["step"] for r in recs] == list(range(1, 21))
    first, last = [r["loss"] for r in recs[:5]], [r["loss"] for r in recs[-5:]]
    assert sum(last) < 0.95 * sum(first), [r["loss"] for r in recs]
    assert {"loss_view0", "loss_view1"} <= set(recs[0])
