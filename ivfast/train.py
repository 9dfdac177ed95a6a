"""Train Stage 1 or Stage 2 (``model.stage``).

    deepspeed ivfast/train.py --config configs/tiny.yaml [key=value ...]
    python ivfast/train.py --config configs/tiny.yaml output_dir=runs/x train.max_steps=20

Any number of dotted overrides follow the config file. Running the same command again
resumes from the newest complete checkpoint in ``<output_dir>/checkpoints``.

Exit status: 0 done (or stopped by SIGTERM/SIGINT after saving), 1 failed, 2 a bad config or
launch environment (one line on stderr), 75 stopped by SIGUSR1 after saving: requeue the job
(``sbatch --signal=USR1@120 --requeue``; README, "Launching on a cluster").
"""
import os
import sys

# Run as a script, this file's folder is sys.path[0]; drop it so that its modules
# (config.py, data/, models/ ...) never shadow top-level packages, and make the repo
# importable when the package is not installed.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
if os.path.dirname(_here) not in sys.path:
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402

from ivfast.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train InternVideo-Next Stage 1 with DeepSpeed.")
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 output_dir=runs/x")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from ivfast.training.distributed import (
        LaunchError,
        apply_launch_env,
        configure_allocator,
    )

    try:
        launch = apply_launch_env()  # srun's variables -> RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
    except LaunchError as e:
        print(f"ivfast: {e}", file=sys.stderr)
        return 2
    if launch and os.environ.get("RANK", "0") == "0":
        print(f"ivfast: {launch}", file=sys.stderr)
    note = configure_allocator(cfg.train.allocator)  # before anything can start CUDA
    if note and os.environ.get("RANK", "0") == "0":
        print(f"ivfast: {note}", file=sys.stderr)
    from ivfast.training.trainer import StopRequested, train

    result = train(cfg)
    if result["status"] == "stopped" and StopRequested.received in StopRequested.REQUEUE_SIGNALS:
        return StopRequested.REQUEUE_EXIT  # SIGUSR1: saved, to be requeued and resumed
    return 0 if result["status"] in ("done", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
