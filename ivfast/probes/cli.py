"""``ivfast-probe classify|depth|track --config FILE [key=value ...]``: train and evaluate a
probe head on a frozen encoder; writes ``OUTPUT_DIR/config.yaml``, ``metrics.jsonl``,
``results.json`` and ``checkpoints/``. Exit status 2 on a config error (one line on stderr)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ivfast.config import ConfigError, save_config
from ivfast.probes.config import load_probe_config

TASKS = ("classify", "depth", "track")


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
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    if args.task == "classify":
        from ivfast.probes.classify import run
    elif args.task == "depth":
        from ivfast.probes.depth import run
    else:
        from ivfast.probes.track import run
    out = run(cfg)
    print(json.dumps({"task": args.task, "step": out["step"], **out["eval"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
