"""``ivfast-export``: the trained video encoder as a plain safetensors file plus its constructor arguments.

    ivfast-export CHECKPOINT OUT_DIR [--config CONFIG_YAML] [--full]
    python -m ivfast.export CHECKPOINT OUT_DIR ...      (without the console script)

CHECKPOINT: anything :func:`ivfast.checkpoint_io.load_model_state` reads (run directory,
checkpoints directory, ``step_XXXXXXXX`` directory, ``.safetensors`` model state). The config
defaults to the run's ``config.yaml``. Outputs: see :func:`export`.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

FORMAT = "ivfast-encoder/1"
ENCODER_FILE = "encoder.safetensors"
ENCODER_YAML = "encoder.yaml"
FULL_FILE = "model.safetensors"


def encoder_kwargs(cfg) -> dict:
    """``VideoEncoder`` constructor arguments of a run config (no ``return_layers``)."""
    from ivfast.models.encoder import encoder_kwargs as kwargs_of

    return kwargs_of(cfg.model.encoder, num_frames=cfg.data.num_frames, img_size=cfg.data.img_size)


def encoder_state(state: dict, prefix: str = "encoder.") -> dict:
    """The ``encoder.*`` entries of a model state dict, prefix removed (never the Stage-2 ``teacher.*``)."""
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        heads = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"the model state has no '{prefix}*' keys (top-level names: {heads[:10]})")
    return out


def build_encoder(kwargs: dict, state: dict | None = None):
    """A ``VideoEncoder`` from constructor arguments, loaded strictly from ``state`` when given."""
    from ivfast.models.encoder import VideoEncoder

    enc = VideoEncoder(**kwargs)
    if state is not None:
        result = enc.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"encoder weights do not fit the config: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
    return enc


def export(checkpoint: str, out_dir: str, config_path: str | None = None, full: bool = False) -> dict:
    """Write the export files; returns {"encoder": path, "yaml": path, ["model": path, "config": path]}.

    - ``OUT_DIR/encoder.safetensors``: the encoder's fp32 weights, keys as in
      ``VideoEncoder.state_dict()`` (the model's ``encoder.*`` keys: in Stage 2 the student's,
      never the teacher's);
    - ``OUT_DIR/encoder.yaml``: the ``VideoEncoder`` constructor arguments, the data size and
      frame count and the input normalisation, so that :func:`load_exported_encoder` rebuilds it;
    - with ``full``: ``OUT_DIR/model.safetensors`` (the whole model state, fp32) and
      ``OUT_DIR/config.yaml`` (the run config), e.g. to start Stage 2 from one file
      (``model.stage2.init_checkpoint=OUT_DIR/model.safetensors``).

    ``config_path`` defaults to the ``config.yaml`` of the run directory above the checkpoint
    (or beside a ``.safetensors`` file). The weights are checked against the config before
    anything is written.
    """
    from ivfast.checkpoint_io import find_run_dir, load_model_state, resolve_checkpoint, save_safetensors
    from ivfast.config import load_config, save_config
    from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    resolve_checkpoint(checkpoint)  # a missing or incomplete checkpoint is the first error
    if config_path is None:
        run_dir = find_run_dir(checkpoint)
        if run_dir is None:
            raise FileNotFoundError(f"no config.yaml found for {checkpoint} (looked in the run directory above "
                                    "it and beside it); pass --config")
        config_path = os.path.join(run_dir, "config.yaml")
    cfg = load_config(config_path)
    state = load_model_state(checkpoint)
    kwargs = encoder_kwargs(cfg)
    enc_state = encoder_state(state)
    try:
        build_encoder(kwargs, enc_state)  # checks names and shapes before anything is written
    except RuntimeError as e:  # load_state_dict's size mismatches
        raise ValueError(f"encoder weights do not fit {config_path}: {str(e).splitlines()[-1].strip()}") from None

    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": FORMAT, "stage": str(cfg.model.stage), "source": os.path.abspath(checkpoint)}
    paths = {"encoder": os.path.join(out_dir, ENCODER_FILE), "yaml": os.path.join(out_dir, ENCODER_YAML)}
    save_safetensors(enc_state, paths["encoder"], metadata=meta)
    info = {
        "format": FORMAT,
        "stage": cfg.model.stage,
        "source": os.path.abspath(checkpoint),
        "encoder": kwargs,
        "data": {"num_frames": cfg.data.num_frames, "img_size": cfg.data.img_size,
                 "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    tmp = f"{paths['yaml']}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(info, f, sort_keys=False)
    os.replace(tmp, paths["yaml"])
    if full:
        paths["model"] = os.path.join(out_dir, FULL_FILE)
        paths["config"] = os.path.join(out_dir, "config.yaml")
        save_safetensors(state, paths["model"], metadata={**meta, "format": "ivfast-model/1"})
        save_config(cfg, paths["config"])
    return paths


def load_exported_encoder(out_dir: str, *, drop_path: float | None = None, map_location="cpu"):
    """The ``VideoEncoder`` of an export directory, weights loaded, in eval mode.

    ``drop_path`` overrides the training value recorded in ``encoder.yaml`` (e.g. for fine-tuning).
    """
    from safetensors.torch import load_file

    with open(os.path.join(out_dir, ENCODER_YAML)) as f:
        info = yaml.safe_load(f)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{os.path.join(out_dir, ENCODER_YAML)} is not an ivfast encoder export ({FORMAT})")
    kwargs = dict(info["encoder"])
    if drop_path is not None:
        kwargs["drop_path"] = float(drop_path)
    state = load_file(os.path.join(out_dir, ENCODER_FILE), device=str(map_location))
    enc = build_encoder(kwargs, state)
    return enc.to(map_location).eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ivfast-export", description="Export the trained video encoder of an ivfast run.")
    p.add_argument("checkpoint", help="run dir, checkpoints dir, step_XXXXXXXX dir or .safetensors model state")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--config", default=None, help="the run's config YAML (default: config.yaml of the run)")
    p.add_argument("--full", action="store_true", help="also write the whole model state (model.safetensors) "
                                                       "and the run config")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ivfast.checkpoint_io import CheckpointError
    from ivfast.config import ConfigError

    try:
        paths = export(args.checkpoint, args.out_dir, args.config, args.full)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"ivfast-export: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
