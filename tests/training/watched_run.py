"""One tiny Stage-1 training run with every installed logger and a profiled step, made once per
test session and read by the tests of the loggers, the log records, ``ivfast-plot`` and the profiler."""
from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import tempfile

from tests.support import run_train

STEPS, LOG_EVERY, PROFILED = 4, 2, 3


def loggers() -> list[str]:
    return ["jsonl"] + [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is not None]


@functools.lru_cache(maxsize=None)
def watched_run() -> str:
    """The run's output_dir: 4 steps of 4 clips, a record every 2 steps, step 3 profiled."""
    out = tempfile.mkdtemp(prefix="ivfast-watched-")
    atexit.register(shutil.rmtree, out, True)
    run_dir = os.path.join(out, "watched")
    run_train(run_dir, [f"train.max_steps={STEPS}", f"train.log_every={LOG_EVERY}", f"train.profile=[{PROFILED},1]",
                        f"train.loggers=[{','.join(loggers())}]", "train.wandb_mode=offline", "data.batch_size=4",
                        "data.synthetic_clips=32"], WANDB_SILENT="true")
    return run_dir
