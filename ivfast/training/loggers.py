"""Where the log records go: ``train.loggers``, any of ``jsonl``, ``tensorboard``, ``wandb``.

Every logger gets the same record (one per ``train.log_every`` optimiser steps, rank 0 only):
``metrics.jsonl`` keeps it whole; TensorBoard and W&B get each numeric field as a scalar named
by :func:`scalar_tag` (``loss/...``, ``optim/...``, ``throughput/...``, ``time/...``,
``memory/...``, ``progress/...``), against the step. TensorBoard and W&B are optional extras,
imported when the run starts; ``ivfast.config.validate`` already refuses a config that names one
whose package is missing. W&B gets the resolved config, runs offline with
``train.wandb_mode=offline`` (or ``WANDB_MODE=offline`` under ``auto``), writes under
``<output_dir>/wandb`` and keeps its run id in ``<output_dir>/wandb_run_id``, so a resumed run
continues the same W&B run.
"""
from __future__ import annotations

import math
import os
import secrets

from ivfast.config import LOGGER_PACKAGES, Config, to_dict
from ivfast.training.metrics import MetricsWriter

# Record fields that are not scalars of a run's curves.
NOT_SCALARS = {"step"}
GROUPS = (  # (prefix of a field, its section); the first match wins
    ("loss", "loss"), ("diff_", "loss"),
    ("lr", "optim"), ("grad_norm", "optim"),
    ("clips_per_s", "throughput"), ("tokens_per_s", "throughput"), ("tflops", "throughput"), ("mfu", "throughput"),
    ("step_time", "time"), ("data_time", "time"), ("data_share", "time"),
    ("peak_", "memory"), ("mem_", "memory"),
)


class LoggerUnavailable(RuntimeError):
    """An optional logger's package cannot be imported; the message is one line naming the extra."""


def scalar_tag(key: str) -> str | None:
    """The TensorBoard / W&B name of a record field (``loss_recon`` -> ``loss/loss_recon``), None
    for fields that are not curves (``step``)."""
    if key in NOT_SCALARS:
        return None
    for prefix, section in GROUPS:
        if key.startswith(prefix):
            return f"{section}/{key}"
    return f"progress/{key}"  # epoch, skipped_steps, bad_videos, ...


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numeric fields under their tags."""
    out = {}
    for key, value in record.items():
        tag = scalar_tag(key)
        if tag is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[tag] = float(value)
    return out


def _import(name: str):
    package = LOGGER_PACKAGES[name]
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError as e:
        raise LoggerUnavailable(f"train.loggers: '{name}' needs the {package} package "
                                f"(pip install -e '.[{name}]'): {e}") from None


class JsonlLogger:
    """``<output_dir>/metrics.jsonl``: the whole record, one JSON object a line."""

    def __init__(self, cfg: Config):
        self.writer = MetricsWriter(os.path.join(cfg.output_dir, "metrics.jsonl"))

    def log(self, record: dict) -> None:
        self.writer.write(record)

    def close(self) -> None:
        self.writer.close()


class TensorBoardLogger:
    """Scalars in ``train.tensorboard_dir`` (default ``<output_dir>/tensorboard``)."""

    def __init__(self, cfg: Config):
        summary_writer = _import("tensorboard")
        self.log_dir = cfg.train.tensorboard_dir or os.path.join(cfg.output_dir, "tensorboard")
        self.writer = summary_writer(log_dir=self.log_dir, flush_secs=10)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run with the resolved config; resumes the run of an earlier start of this output_dir."""

    def __init__(self, cfg: Config):
        wandb = _import("wandb")
        t = cfg.train
        id_file = os.path.join(cfg.output_dir, "wandb_run_id")
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        name = t.wandb_name or os.path.basename(os.path.normpath(cfg.output_dir))
        self.run = wandb.init(project=t.wandb_project, entity=t.wandb_entity or None, name=name, id=run_id,
                              resume="allow", dir=cfg.output_dir, config=to_dict(cfg),
                              mode=None if t.wandb_mode == "auto" else t.wandb_mode)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class Loggers:
    """The run's loggers (none off rank 0): ``log(record)`` to each, ``close()`` each once."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    @classmethod
    def for_run(cls, cfg: Config, is_main: bool) -> "Loggers":
        if not is_main:
            return cls([])
        made = []
        try:
            for name in cfg.train.loggers:
                made.append(LOGGERS[name](cfg))
        except BaseException:
            cls(made).close()
            raise
        return cls(made)

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()
