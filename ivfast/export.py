"""``ivfast-export``: a video encoder as a Hugging Face style directory (config.json,
model.safetensors, README.md), from an ivfast run or from the authors' release.

    ivfast-export CHECKPOINT OUT_DIR [--config CONFIG_YAML] [--full]
    ivfast-export --from-release RELEASE_CKPT OUT_DIR [--heads N] [--frames T] [--img-size S] [--prefix P]
    python -m ivfast.export ...      (without the console script)

CHECKPOINT: anything :func:`ivfast.checkpoint_io.load_model_state` reads (run directory,
checkpoints directory, ``step_XXXXXXXX`` directory, ``.safetensors`` model state). The config
defaults to the run's ``config.yaml``. RELEASE_CKPT: a checkpoint of the InternVideo-Next
release (:func:`ivfast.models.release.read_release_checkpoint`: ``.pth`` / ``.bin`` read
weights-only, ``.safetensors``): a published encoder, or a Stage-1 / Stage-2 training model.
Outputs: see :func:`export` and :func:`export_release`; the layout is
:mod:`ivfast.models.pretrained`'s, read back by :func:`from_pretrained` (also the older
``encoder.yaml`` + ``encoder.safetensors`` exports).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys


from ivfast.models.pos_embed import resample_table, table_time_rows
from ivfast.models.pretrained import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, from_pretrained, is_pretrained_dir
from ivfast.models.pretrained import FORMAT as PRETRAINED_FORMAT
from ivfast.models.pretrained import LEGACY_FORMAT

__all__ = ["export", "export_release", "run_encoder_state", "from_pretrained", "load_exported_encoder", "is_pretrained_dir", "main",
           "CONFIG_FILE", "WEIGHTS_FILE", "CARD_FILE", "PRETRAINED_FORMAT", "FORMAT"]

FORMAT = LEGACY_FORMAT  # the older layout's format string (encoder.yaml), still read everywhere
RUN_CONFIG = "config.yaml"  # beside a whole-model file: what load_model_state's callers read it with


def full_file(stage: int) -> str:
    """The whole-model file of an export (``--full``, or a release Stage-1 model): ``stage1.safetensors``, ..."""
    return f"stage{int(stage)}.safetensors"


IVFAST_RUN_LICENSE = ("trained with ivfast; the weights are the run owner's to license (a run started from the "
                      "release's weights, model.init_from, carries the release's Apache License 2.0 with it)")
RELEASE_LICENSE_TEXT = ("Apache License 2.0: the InternVideo-Next release (github.com/OpenGVLab/InternVideo, LICENSE "
                        "at the repository root). These are the release's weights, renamed and reshaped for ivfast; no "
                        "value was changed but a cast to float32")


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


def stage2_stored_time_rows(cfg, state: dict) -> int:
    """The time rows of a Stage-2 student's learnable position table (``state``: the whole model's)
    when they are not the clip's (``model.stage2.pos_resample=per_forward`` keeps the Stage-1
    run's and resamples them in every forward), else 0."""
    e = cfg.model.encoder
    table = state.get("encoder.pos.table")
    if (int(cfg.model.stage) != 2 or table is None or not any(k.startswith("teacher.") for k in state)
            or getattr(cfg.model.stage2, "pos_resample", "") != "per_forward"):
        return 0
    try:
        t = table_time_rows(table.shape, e.num_cls_tokens, (cfg.data.img_size // e.patch_size) ** 2)
    except ValueError:  # not a table of this config: loading it names the problem
        return 0
    return t if t != cfg.data.num_frames // e.tubelet_size else 0


def run_encoder_state(cfg, state: dict) -> tuple[dict, list[str]]:
    """The encoder's state dict of a run's model ``state`` (:func:`encoder_state`) at the run's clip
    length, and notes: a Stage-2 table that stores fewer time rows (:func:`stage2_stored_time_rows`)
    is resampled to the clip's frames as the Stage-2 forward does (``align_corners=False``)."""
    enc_state, notes = encoder_state(state), []
    stored_t = stage2_stored_time_rows(cfg, state)
    if stored_t:
        e = cfg.model.encoder
        n_cls, t_clip, side = e.num_cls_tokens, cfg.data.num_frames // e.tubelet_size, cfg.data.img_size // e.patch_size
        enc_state["pos.table"] = resample_table(enc_state["pos.table"], n_cls, t_clip, side, side, align_corners=False)
        notes.append(f"position table: the Stage-2 run stores {stored_t} time rows and resamples them in every forward "
                     f"(model.stage2.pos_resample=per_forward, align_corners=False); exported resampled to its "
                     f"{t_clip} frames, the rows its forward used")
    return enc_state, notes


def export(checkpoint: str, out_dir: str, config_path: str | None = None, full: bool = False) -> dict:
    """Write the encoder of an ivfast run; returns {"config", "model", "card"[, "full", "run_config"]: path}.

    - ``OUT_DIR/config.json``, ``OUT_DIR/model.safetensors``, ``OUT_DIR/README.md``: the
      encoder (the model's ``encoder.*`` keys: in Stage 2 the student's, never the teacher's)
      in :mod:`ivfast.models.pretrained`'s layout, its fp32 weights in ``VideoEncoder`` names,
      the data size, frame count and input normalisation in ``config.json``;
    - with ``full``: ``OUT_DIR/stage{1,2}.safetensors`` (the whole model state, fp32) and
      ``OUT_DIR/config.yaml`` (the run config), e.g. to start Stage 2 from one file
      (``model.stage2.init_checkpoint=OUT_DIR/stage1.safetensors``).

    ``config_path`` defaults to the ``config.yaml`` of the run directory above the checkpoint
    (or beside a ``.safetensors`` file). The weights are checked against the config before
    anything is written.
    """
    from ivfast.checkpoint_io import find_run_dir, load_model_state, resolve_checkpoint
    from ivfast.files import save_safetensors
    from ivfast.config import load_config, save_config
    from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ivfast.models.pretrained import save_pretrained

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
    enc_state, notes = run_encoder_state(cfg, state)
    try:
        enc = build_encoder(kwargs, enc_state)  # checks names and shapes before anything is written
    except RuntimeError as e:  # load_state_dict's size mismatches
        raise ValueError(f"encoder weights do not fit {config_path}: {str(e).splitlines()[-1].strip()}") from None

    stage = int(cfg.model.stage)
    source = {"kind": "ivfast-run", "stage": stage, "checkpoint": os.path.abspath(checkpoint),
              "run_config": os.path.abspath(config_path)}
    if getattr(cfg.model, "init_from", ""):
        source["init_from"] = cfg.model.init_from
    what = "the student encoder of a Stage-2 (latent prediction) run" if stage == 2 else \
        "the encoder of a Stage-1 (alignment + reconstruction) run"
    info = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "encoder": kwargs, "source": source,
            "title": f"ivfast video encoder (Stage {stage})",
            "description": f"The video ViT encoder of an ivfast training run: {what}, exported by `ivfast-export` "
                           "from the checkpoint named under Source.",
            "license": "other", "license_text": IVFAST_RUN_LICENSE, "notes": notes}
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    if full:
        name = full_file(stage)
        paths["full"], paths["run_config"] = os.path.join(out_dir, name), os.path.join(out_dir, RUN_CONFIG)
        save_safetensors(state, paths["full"], metadata={"format": "ivfast-model/1", "stage": str(stage),
                                                         "source": os.path.abspath(checkpoint)})
        save_config(cfg, paths["run_config"])
        use = f", e.g. model.stage2.init_checkpoint=<this dir>/{name}" if stage == 1 else ""
        info["files"] = {name: f"the whole Stage-{stage} model state (fp32){use}",
                         RUN_CONFIG: "the run config of that model"}
    paths = {**save_pretrained(enc, out_dir, info), **paths}
    return paths


def _stage1_run_config(s1):
    """A run config (``ivfast.config.Config``, validated) whose ``stage1_config`` is the Stage-1 model
    config ``s1``; everything else (teacher, data, training) keeps ivfast's defaults."""
    from ivfast.config import Config

    cfg = Config()
    m = cfg.model
    m.stage, m.recon, m.loss_weights = 1, s1.recon, list(s1.loss_weights)
    m.teacher.width = s1.teacher_width
    m.encoder, m.align = s1.encoder, s1.align
    for dst, src in ((m.predictor, s1.predictor), (m.diffusion, s1.diffusion)):
        for f in dataclasses.fields(src):
            setattr(dst, f.name, getattr(src, f.name))
    cfg.data.num_frames, cfg.data.img_size = s1.num_frames, s1.img_size
    # the teacher sees the student's token grid (its img_size / patch_size; 256 / 16 at the release's 224 / 14)
    m.teacher.img_size = (s1.img_size // s1.encoder.patch_size) * m.teacher.patch_size
    return cfg


def export_release(checkpoint: str, out_dir: str, *, heads: int | None = None, num_frames: int | None = None,
                   img_size: int | None = None, prefix: str | None = None) -> dict:
    """Import a checkpoint of the InternVideo-Next release; returns {"config", "model", "card"[, "full",
    "run_config"]: path, "report": ReleaseImport}.

    Every release key is mapped (:func:`ivfast.models.release.map_encoder`) or belongs to a
    known part that ivfast's encoder lacks (listed in config.json's ``not_imported`` and in the
    card); any other key, a missing key or a shape that does not fit stops the import before
    anything is written. Writes the encoder layout of :func:`export`; for a Stage-1 training
    model also ``stage1.safetensors`` (the whole ivfast ``Stage1Model`` state,
    :func:`ivfast.models.release_stage1.map_stage1`) and ``config.yaml`` (a run config whose
    model is the one inferred from the weights; what the weights do not say takes the
    release's values). ``heads`` / ``num_frames`` / ``img_size``: see
    :func:`ivfast.models.release.infer_encoder_kwargs`.
    """
    from ivfast.files import save_safetensors
    from ivfast.config import save_config, stage1_config, validate
    from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ivfast.models.pretrained import save_pretrained
    from ivfast.models.release import (RELEASE_LICENSE, RELEASE_SOURCE, ReleaseCheckpointError,
                                       import_release_encoder, read_release_checkpoint)

    state = read_release_checkpoint(checkpoint)
    imp = import_release_encoder(state, prefix=prefix, heads=heads, num_frames=num_frames, img_size=img_size)
    try:
        enc = build_encoder(imp.encoder_kwargs, imp.encoder_state)
    except RuntimeError as e:
        raise ReleaseCheckpointError(f"mapped release encoder does not fit ivfast's VideoEncoder: "
                                     f"{str(e).splitlines()[-1].strip()}") from None
    groups: dict = {}
    for k in imp.not_imported:
        g = k[len(imp.prefix):].split(".")[0]
        groups[g] = groups.get(g, 0) + 1
    source = {"kind": "release", "release": RELEASE_SOURCE, "release_model": imp.kind,
              "checkpoint": os.path.abspath(checkpoint), "prefix": imp.prefix,
              "stored_dtype": "/".join(imp.source_dtypes)}
    kind_text = {"encoder": "a published InternVideo-Next encoder (models/InternVideo_next.py)",
                 "stage1": "the encoder of an InternVideo-Next Stage-1 training model (models/InternVideo_next_s1.py)",
                 "stage2": "the encoder of an InternVideo-Next Stage-2 training model (models/InternVideo_next_s2.py)"}
    info = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "encoder": imp.encoder_kwargs,
            "source": source, "title": f"InternVideo-Next encoder (ivfast layout, from the release's {imp.kind})",
            "description": f"{kind_text[imp.kind][0].upper()}{kind_text[imp.kind][1:]}, converted by "
                           "`ivfast-export --from-release` into ivfast's VideoEncoder names. Its patch tokens equal "
                           "the release model's forward output on the same normalised clip (fp32).",
            "license": RELEASE_LICENSE, "license_text": RELEASE_LICENSE_TEXT, "not_imported": groups,
            "notes": list(imp.notes)}
    paths: dict = {}
    s1_state = s1_cfg = None
    if imp.kind == "stage1":
        try:
            from ivfast.models.release_stage1 import infer_stage1_config, map_stage1
        except ImportError as e:  # pragma: no cover - the module ships with ivfast
            raise NotImplementedError(f"importing a release Stage-1 model needs ivfast.models.release_stage1 ({e})")
        plain = {k[len(imp.prefix):]: v for k, v in state.items()}
        s1_model_cfg = infer_stage1_config(plain, heads=heads, num_frames=num_frames, img_size=img_size)
        s1_state, _ = map_stage1(plain, s1_model_cfg,  # the encoder as import_release_encoder mapped it
                                 encoder=(imp.encoder_state, [k[len(imp.prefix):] for k in imp.consumed]))
        s1_cfg = _stage1_run_config(s1_model_cfg)
        validate(s1_cfg)
        want, got = dataclasses.asdict(s1_model_cfg), dataclasses.asdict(stage1_config(s1_cfg))
        if any(got[k] != v if not isinstance(v, dict) else any(got[k][kk] != vv for kk, vv in v.items())
               for k, v in want.items()):
            raise ReleaseCheckpointError("internal: the written run config would not rebuild the inferred Stage-1 model")
        name = full_file(1)
        info["files"] = {name: "the whole release Stage-1 model in ivfast's Stage1Model names (fp32), e.g. "
                               f"model.stage2.init_checkpoint=<this dir>/{name}",
                         RUN_CONFIG: "a run config with that model (inferred from the weights; teacher and "
                                     "training settings are ivfast's defaults: set them for your run)"}
        info["not_imported"] = {}  # the Stage-1 parts are in stage1.safetensors
        info["notes"] = [n for n in info["notes"] if not n.startswith("clip_projector")]
    os.makedirs(out_dir, exist_ok=True)
    if s1_state is not None:
        paths["full"], paths["run_config"] = os.path.join(out_dir, full_file(1)), os.path.join(out_dir, RUN_CONFIG)
        save_safetensors(s1_state, paths["full"], metadata={"format": "ivfast-model/1", "stage": "1",
                                                            "source": os.path.abspath(checkpoint)})
        save_config(s1_cfg, paths["run_config"])
    paths = {**save_pretrained(enc, out_dir, info), **paths}
    paths["report"] = imp
    return paths


def load_exported_encoder(out_dir: str, *, drop_path: float | None = None, map_location="cpu"):
    """The ``VideoEncoder`` of an export directory (either layout), weights loaded, in eval mode
    (:func:`from_pretrained`). ``drop_path`` overrides the recorded training value (e.g. for fine-tuning)."""
    return from_pretrained(out_dir, drop_path=drop_path, map_location=map_location)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ivfast-export", description="Export a video encoder (config.json, "
                                "model.safetensors, README.md) from an ivfast run or the InternVideo-Next release.")
    p.add_argument("checkpoint", help="run dir, checkpoints dir, step_XXXXXXXX dir or .safetensors model state; "
                                      "with --from-release: a release checkpoint (.pth/.bin/.safetensors or a dir)")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--config", default=None, help="the run's config YAML (default: config.yaml of the run)")
    p.add_argument("--full", action="store_true", help="also write the whole model state (stage{1,2}.safetensors) "
                                                       "and the run config (config.yaml)")
    p.add_argument("--from-release", action="store_true", help="CHECKPOINT is the InternVideo-Next release's")
    p.add_argument("--heads", type=int, default=None, help="(--from-release) attention heads, when the width is none "
                                                           "of the release's")
    p.add_argument("--frames", type=int, default=None, help="(--from-release) frames the position table is for")
    p.add_argument("--img-size", type=int, default=None, help="(--from-release) image size the table is for")
    p.add_argument("--prefix", default=None, help="(--from-release) the encoder's key prefix (default: found)")
    args = p.parse_args(argv)
    if args.from_release and (args.config or args.full):
        p.error("--config and --full are for ivfast runs (a release Stage-1 model always gets stage1.safetensors)")
    if not args.from_release and any(v is not None for v in (args.heads, args.frames, args.img_size, args.prefix)):
        p.error("--heads, --frames, --img-size and --prefix need --from-release")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ivfast.checkpoint_io import CheckpointError
    from ivfast.config import ConfigError

    try:
        if args.from_release:
            paths = export_release(args.checkpoint, args.out_dir, heads=args.heads, num_frames=args.frames,
                                   img_size=args.img_size, prefix=args.prefix)
        else:
            paths = export(args.checkpoint, args.out_dir, args.config, args.full)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"ivfast-export: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    report = paths.pop("report", None)
    if report is not None:
        print(report.summary())
        for note in report.notes:
            print(f"note: {note}")
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
