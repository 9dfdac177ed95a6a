"""``ivfast-probe classify|depth|track --config FILE [key=value ...]``: train and evaluate a
probe head on a frozen encoder; writes ``OUTPUT_DIR/config.yaml``, ``metrics.jsonl``,
``results.json``, ``backbone.json`` (which backbone, how the clips were fitted to it) and
``checkpoints/``. The log's first lines name the backbone (source, path, parameters,
architecture). Exit status 2 on a config error or clips that do not fit the backbone, 1 on a
backbone that cannot be read (one line on stderr)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ivfast.checkpoint_io import CheckpointError
from ivfast.files import atomic_write_text
from ivfast.config import ConfigError, save_config
from ivfast.probes.config import load_probe_config
from ivfast.probes.features import BackboneMismatch, FrozenBackbone, describe_backbone, load_backbone

TASKS = ("classify", "depth", "track")


def clip_shape(cfg, task: str) -> tuple[tuple[int, int, int], str]:
    """``((frames, height, width), what)``: the clips a probe feeds its backbone, and their config keys."""
    if task == "classify":
        c = cfg.classify
        return (c.num_frames, c.img_size, c.img_size), (f"classify clips (classify.num_frames={c.num_frames}, "
                                                         f"classify.img_size={c.img_size})")
    if task == "depth":
        d = cfg.depth
        return (d.window, d.img_size, d.img_size), f"depth windows (depth.window={d.window}, depth.img_size={d.img_size})"
    t = cfg.track
    return (t.window, t.crop, t.crop), f"track windows (track.window={t.window}, track.crop={t.crop})"


def check_backbone(cfg, task: str) -> tuple:
    """Load the backbone ``cfg`` selects, print which it is (the log's first lines) and how the
    probe's clips are fitted to it; :class:`BackboneMismatch` (one line naming both sides) when
    they cannot be, before any training. Returns the encoder (the probe runs on it: loaded once)
    and what ``OUTPUT_DIR/backbone.json`` records."""
    encoder, info = load_backbone(cfg.backbone)
    for line in describe_backbone(info, cfg.backbone.layer):
        print(line, flush=True)
    (t, h, w), what = clip_shape(cfg, task)
    fits = FrozenBackbone(encoder, cfg.backbone.layer).fit(t, h, w, what)
    for line in fits:
        print(f"backbone: {line}", flush=True)
    return encoder, {**info, "clips": fits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ivfast-probe", description="Frozen-backbone evaluation probes.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--config", default=None, help="probe YAML: a file, or a packaged name such as probes/probe_classify_tiny")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=3e-3 depth.window=32")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_probe_config(args.task, args.config, args.overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    try:
        encoder, notes = check_backbone(cfg, args.task)
    except BackboneMismatch as e:
        print(f"ivfast-probe: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, CheckpointError) as e:  # a missing or unreadable export / checkpoint
        print(f"ivfast-probe: backbone: {e}", file=sys.stderr)
        return 1
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    atomic_write_text(os.path.join(cfg.output_dir, "backbone.json"), json.dumps(notes, indent=1) + "\n")
    if args.task == "classify":
        from ivfast.probes.classify import run
    elif args.task == "depth":
        from ivfast.probes.depth import run
    else:
        from ivfast.probes.track import run
    out = run(cfg, encoder)
    print(json.dumps({"task": args.task, "step": out["step"], **out["eval"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
