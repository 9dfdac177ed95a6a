"""An encoder on disk in the Hugging Face layout, and reading it back (also into a built encoder).

A directory written by :func:`save_pretrained` (``ivfast-export``, also ``--from-release``):

- ``config.json``: ``format`` (:data:`FORMAT`), ``architecture`` ("VideoEncoder"), the
  :class:`VideoEncoder` constructor arguments by their names (``img_size``, ``patch_size``,
  ``num_frames``, ``tubelet_size``, ``in_chans``, ``width``, ``depth``, ``heads``, ``mlp_ratio``,
  ``block``, ``num_cls_tokens``, ``layer_scale_init``, ``drop_path``, ``pos_learnable``,
  ``gelu``), the input normalisation ``mean`` / ``std`` (RGB in [0, 1]), ``source`` (where the
  weights came from) and ``license``;
- ``model.safetensors``: the encoder's fp32 state dict in ``VideoEncoder.state_dict()`` names;
- ``README.md``: a model card (what it is, where it came from, how to load it, licenses).

The older ``ivfast-encoder/1`` directories (``encoder.yaml`` + ``encoder.safetensors``) are read
as well, by :func:`read_pretrained` and everything built on it.

:func:`from_pretrained` rebuilds the encoder (eval mode); its ``forward(video)`` takes a clip
(B, 3, T, H, W) and returns an ``EncoderOutput`` (``.tokens``, ``.patch_tokens``,
``.cls_tokens``). :func:`load_encoder_weights` loads a directory into an encoder built
elsewhere (a run's ``model.init_from``), resampling the position table in time when the frame
counts differ and stopping on any other difference of architecture.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ivfast.files import atomic_write_text, save_safetensors
from ivfast.models.encoder import VideoEncoder
from ivfast.models.layers import LayerScale
from ivfast.models.pos_embed import resample_table
from ivfast.models.release import mlp_ratio_for
from ivfast.models.weights import LoadReport

__all__ = [
    "FORMAT",
    "LEGACY_FORMAT",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CARD_FILE",
    "IVFAST_LICENSE_NOTE",
    "PretrainedEncoder",
    "encoder_args_of",
    "is_pretrained_dir",
    "read_pretrained",
    "save_pretrained",
    "from_pretrained",
    "load_encoder_weights",
    "model_card",
]

FORMAT = "ivfast-encoder/2"
LEGACY_FORMAT = "ivfast-encoder/1"
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
LEGACY_YAML, LEGACY_WEIGHTS = "encoder.yaml", "encoder.safetensors"

ENCODER_ARGS = ("img_size", "patch_size", "num_frames", "tubelet_size", "in_chans", "width", "depth", "heads",
                "mlp_ratio", "block", "num_cls_tokens", "layer_scale_init", "drop_path", "pos_learnable", "gelu")
# What must agree for weights to load (num_frames is resampled, drop_path is training-only).
ARCH_ARGS = ("img_size", "patch_size", "tubelet_size", "in_chans", "width", "depth", "heads", "mlp_hidden", "block",
             "num_cls_tokens", "layer_scale", "pos_learnable", "gelu")

IVFAST_LICENSE_NOTE = ("ivfast, the code that wrote this directory, declares no license in its repository: ask its "
                       "maintainers before redistributing ivfast itself")


class PretrainedError(ValueError):
    """A directory that is not a readable encoder export, or one that does not fit the encoder asked for."""


@dataclass
class PretrainedEncoder:
    """An export directory read back: its format, constructor arguments, weights and metadata."""

    path: str
    format: str
    kwargs: dict
    state: dict
    mean: list | None = None
    std: list | None = None
    config: dict = field(default_factory=dict)


def encoder_args_of(encoder: VideoEncoder) -> dict:
    """The constructor arguments a built :class:`VideoEncoder` was made with, read from its modules
    (``drop_path``: the deepest block's rate, the constructor's maximum)."""
    blk = encoder.blocks[0]
    t, h, _ = encoder.grid
    ls = blk.ls1
    return dict(img_size=h * encoder.patch_size, patch_size=encoder.patch_size, num_frames=t * encoder.tubelet_size,
                tubelet_size=encoder.tubelet_size, in_chans=encoder.in_chans, width=encoder.width,
                depth=encoder.depth, heads=blk.attn.heads,
                mlp_ratio=mlp_ratio_for(encoder.width, blk.mlp.fc1.out_features), block=encoder.block_style,
                num_cls_tokens=encoder.num_cls,
                layer_scale_init=float(ls.init) if isinstance(ls, LayerScale) else None,
                drop_path=float(encoder.blocks[-1].drop_path1.p), pos_learnable=bool(encoder.pos.learnable),
                gelu=blk.mlp.gelu)


def _arch(kwargs: dict) -> dict:
    """The comparable architecture of constructor arguments (defaults as VideoEncoder's)."""
    width = int(kwargs.get("width", 768))
    return dict(img_size=int(kwargs.get("img_size", 224)), patch_size=int(kwargs.get("patch_size", 14)),
                tubelet_size=int(kwargs.get("tubelet_size", 1)), in_chans=int(kwargs.get("in_chans", 3)),
                width=width, depth=int(kwargs.get("depth", 12)), heads=int(kwargs.get("heads", 12)),
                mlp_hidden=int(width * float(kwargs.get("mlp_ratio", 4.0))), block=kwargs.get("block", "release"),
                num_cls_tokens=int(kwargs.get("num_cls_tokens", 4)),
                layer_scale=kwargs.get("layer_scale_init", 1e-5) is not None and kwargs.get("block", "release") == "release",
                pos_learnable=bool(kwargs.get("pos_learnable", True)), gelu=kwargs.get("gelu", "erf"))


def _differences(a: dict, b: dict, names=("export", "model")) -> list[str]:
    x, y = _arch(a), _arch(b)
    return [f"{k}: {names[0]} {x[k]!r}, {names[1]} {y[k]!r}" for k in ARCH_ARGS if x[k] != y[k]]


# ----------------------------------------------------------------------------- reading


def is_pretrained_dir(path: str) -> bool:
    """True for a directory of either layout (``config.json`` + ``model.safetensors``, or
    ``encoder.yaml`` + ``encoder.safetensors``)."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))
        or os.path.isfile(os.path.join(path, LEGACY_YAML)) and os.path.isfile(os.path.join(path, LEGACY_WEIGHTS)))


def read_pretrained(path: str, *, map_location="cpu") -> PretrainedEncoder:
    """An export directory of either layout: constructor arguments, weights, normalisation."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) in (CONFIG_FILE, WEIGHTS_FILE, LEGACY_YAML, LEGACY_WEIGHTS):
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise PretrainedError(f"encoder export not found: {path} (a directory written by ivfast-export)")
    cfg_path, yaml_path = os.path.join(path, CONFIG_FILE), os.path.join(path, LEGACY_YAML)
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise PretrainedError(f"{cfg_path}: not JSON ({e})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            got = config.get("format") if isinstance(config, dict) else None
            raise PretrainedError(f"{cfg_path} is not an ivfast encoder export (format {got!r}, expected {FORMAT!r})")
        kwargs = {k: config[k] for k in ENCODER_ARGS if k in config}
        fmt, weights = FORMAT, os.path.join(path, WEIGHTS_FILE)
        mean, std = config.get("mean"), config.get("std")
    elif os.path.isfile(yaml_path):
        import yaml

        with open(yaml_path) as f:
            config = yaml.safe_load(f)
        if not isinstance(config, dict) or config.get("format") != LEGACY_FORMAT:
            raise PretrainedError(f"{yaml_path} is not an ivfast encoder export ({LEGACY_FORMAT})")
        kwargs = dict(config["encoder"])
        fmt, weights = LEGACY_FORMAT, os.path.join(path, LEGACY_WEIGHTS)
        data = config.get("data") or {}
        mean, std = data.get("mean"), data.get("std")
    else:
        raise PretrainedError(f"{path} holds neither {CONFIG_FILE} (ivfast-export) nor {LEGACY_YAML} "
                              "(older ivfast-export): not an encoder export")
    missing = [k for k in ("width", "depth", "heads", "patch_size", "num_frames", "img_size") if k not in kwargs]
    if missing:
        raise PretrainedError(f"{path}: the export's config lacks {missing}")
    if not os.path.isfile(weights):
        raise PretrainedError(f"{path}: {os.path.basename(weights)} is missing")
    try:
        state = load_file(weights, device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise PretrainedError(f"{weights}: not a readable safetensors file ({e})") from None
    return PretrainedEncoder(path, fmt, kwargs, state, mean, std, config)


def _check_keys(encoder: torch.nn.Module, state: dict, path: str) -> None:
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k}: export {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:6]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}")
        if bad:
            parts.append("shapes " + "; ".join(bad[:6]))
        raise PretrainedError(f"{path}: the weights do not fit the encoder: " + ", ".join(parts))


def from_pretrained(path: str, *, drop_path: float | None = None, return_layers=(), map_location="cpu") -> VideoEncoder:
    """The :class:`VideoEncoder` of an export directory (either layout), weights loaded, eval mode.

    ``encoder(video)`` with ``video`` (B, 3, T, H, W) normalised with the export's ``mean`` /
    ``std`` returns an ``EncoderOutput``: ``.tokens`` (B, num_cls + N, width), ``.patch_tokens``
    (the release's ``forward`` output), ``.cls_tokens``. ``drop_path`` overrides the recorded
    training value (e.g. to fine-tune).
    """
    return encoder_from(read_pretrained(path, map_location=map_location), drop_path=drop_path,
                        return_layers=return_layers, map_location=map_location)


def encoder_from(pre: PretrainedEncoder, *, drop_path: float | None = None, return_layers=(),
                 map_location="cpu") -> VideoEncoder:
    """The :class:`VideoEncoder` of an export already read (:func:`read_pretrained`), as
    :func:`from_pretrained` builds it."""
    kwargs = dict(pre.kwargs)
    if drop_path is not None:
        kwargs["drop_path"] = float(drop_path)
    enc = VideoEncoder(**kwargs, return_layers=tuple(return_layers))
    _check_keys(enc, pre.state, pre.path)
    enc.load_state_dict(pre.state, strict=True)
    return enc.to(map_location).eval()


@torch.no_grad()
def load_encoder_weights(encoder: VideoEncoder, path: str, *, align_corners: bool = True) -> LoadReport:
    """Load the export at ``path`` (either layout) into ``encoder`` (a run's ``model.init_from``).

    Everything but the frame count must agree (width, depth, heads, MLP size, patch, tubelet,
    image size, CLS tokens, LayerScale, block style, position table kind, GELU): otherwise
    :class:`PretrainedError` (a ValueError) names each difference and nothing is written. A
    learnable position table for another frame count is resampled in time
    (:func:`resample_table`, ``align_corners`` as there; the release resamples with
    ``align_corners=False``). Returns a ``LoadReport`` (``loaded``, ``interpolated``, ``notes``).
    """
    pre = read_pretrained(path)
    mine = encoder_args_of(encoder)
    diff = _differences(pre.kwargs, mine)
    if diff:
        raise PretrainedError(f"{pre.path}: the exported encoder's architecture differs from this run's encoder "
                              f"(model.encoder / data config): {'; '.join(diff)}")
    report = LoadReport(path=pre.path, layout=pre.format, prefix="")
    state = dict(pre.state)
    t_old = int(pre.kwargs["num_frames"]) // int(pre.kwargs.get("tubelet_size", 1))
    t_new, h, w = encoder.pos.grid  # the table's own time rows (a Stage-2 table may store fewer than the clip's)
    if t_old != t_new:
        if "pos.table" in state:
            state["pos.table"] = resample_table(state["pos.table"], encoder.num_cls, t_new, h, w,
                                                align_corners=align_corners)
            report.interpolated["pos.table"] = (t_old, t_new)
        else:
            report.notes.append(f"fixed sine-cosine position table: {t_old} -> {t_new} time steps computed, not loaded")
    _check_keys(encoder, state, pre.path)
    encoder.load_state_dict(state, strict=True)
    report.loaded = list(state)
    report.source_dtypes = sorted({str(v.dtype).replace("torch.", "") for v in pre.state.values()})
    source = pre.config.get("source") if isinstance(pre.config.get("source"), dict) else {}
    if source:
        report.notes.append("source: " + ", ".join(f"{k}={v}" for k, v in source.items()))
    return report


# ----------------------------------------------------------------------------- writing


def save_pretrained(encoder: VideoEncoder, out_dir: str, info: dict) -> dict[str, str]:
    """Write ``encoder`` to ``out_dir`` in the Hugging Face layout; returns {"config", "model", "card"} paths.

    ``info``: ``mean`` and ``std`` (required: the input normalisation), ``source`` (a dict: where
    the weights came from, e.g. ``{"kind": "ivfast-run", "stage": 1, "checkpoint": ...}`` or
    ``{"kind": "release", ...}``), ``description`` (the card's opening paragraph), ``license``
    (the card's license id, default "other") and ``license_text``, ``not_imported`` (a dict
    group -> count of source tensors left out), ``notes`` (lines), ``files`` (name ->
    description of other files written beside, e.g. a whole Stage-1 model), optional
    ``encoder`` (constructor arguments; checked against the module, default read from it).
    """
    for k in ("mean", "std"):
        if k not in info or len(info[k]) != encoder.in_chans:
            raise ValueError(f"save_pretrained needs info[{k!r}]: {encoder.in_chans} values (the input normalisation)")
    kwargs = dict(info.get("encoder") or encoder_args_of(encoder))
    diff = _differences(kwargs, encoder_args_of(encoder), names=("info", "module"))
    if int(kwargs["num_frames"]) != encoder.grid[0] * encoder.tubelet_size:
        diff.append(f"num_frames: info {kwargs['num_frames']}, module {encoder.grid[0] * encoder.tubelet_size}")
    if diff:
        raise ValueError("save_pretrained: info['encoder'] disagrees with the encoder: " + "; ".join(diff))
    config = {"format": FORMAT, "architecture": "VideoEncoder", "library": "ivfast"}
    config.update({k: kwargs[k] for k in ENCODER_ARGS if k in kwargs})
    config["mean"], config["std"] = [float(v) for v in info["mean"]], [float(v) for v in info["std"]]
    config["input"] = "(B, in_chans, T, H, W) float, RGB in [0, 1] normalised with mean/std"
    config["output"] = "EncoderOutput: tokens (B, num_cls_tokens + T/tubelet*H/patch*W/patch, width), no final norm"
    config["dtype"] = "float32"
    config["source"] = dict(info.get("source") or {})
    config["license"] = info.get("license", "other")
    if info.get("not_imported"):
        config["not_imported"] = dict(info["not_imported"])
    if info.get("notes"):
        config["notes"] = list(info["notes"])
    if info.get("files"):
        config["files"] = dict(info["files"])

    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
             for k, v in encoder.state_dict().items()}
    pos = encoder.pos
    if pos.learnable and tuple(pos.grid) != tuple(encoder.grid):  # a table that resamples its stored time rows
        with torch.no_grad():
            rows = torch.cat([pos.cls, pos.patch_rows_for(*encoder.grid)], dim=0)  # what its forward adds
        state["pos.table"] = rows.detach().float().cpu().contiguous().clone()
    os.makedirs(out_dir, exist_ok=True)
    paths = {"config": os.path.join(out_dir, CONFIG_FILE), "model": os.path.join(out_dir, WEIGHTS_FILE),
             "card": os.path.join(out_dir, CARD_FILE)}
    save_safetensors(state, paths["model"], metadata={"format": FORMAT, "architecture": "VideoEncoder"})
    atomic_write_text(paths["config"], json.dumps(config, indent=2) + "\n")
    atomic_write_text(paths["card"], model_card(config, info))
    return paths


def model_card(config: dict, info: dict) -> str:
    """The README.md of an export directory (Hugging Face model card with YAML front matter)."""
    c = config
    t, s = c["num_frames"] // c.get("tubelet_size", 1), c["img_size"] // c["patch_size"]
    n_tok = t * s * s
    title = info.get("title") or "ivfast video encoder"
    ls = "LayerScale" if c.get("layer_scale_init") is not None and c.get("block") == "release" else "no LayerScale"
    style = (f"release-style blocks (pre-norm RMSNorm, QK-norm, no qkv bias, {ls}, {c.get('gelu')}-GELU MLP)"
             if c.get("block") == "release" else f"plain blocks (LayerNorm, qkv bias, {c.get('gelu')}-GELU MLP)")
    lines = [
        "---",
        f"license: {c.get('license', 'other')}",
        "library_name: ivfast",
        "tags:",
        "- video",
        "- video-encoder",
        "- internvideo-next",
        "- ivfast",
        "---",
        "",
        f"# {title}",
        "",
        info.get("description") or "A video ViT encoder exported by ivfast.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | ivfast `VideoEncoder`: ViT over {c.get('tubelet_size', 1)}x{c['patch_size']}x"
        f"{c['patch_size']} tubelets, {style} |",
        f"| width / depth / heads | {c['width']} / {c['depth']} / {c['heads']} (MLP ratio {c.get('mlp_ratio'):g}) |",
        f"| input | {c['num_frames']} frames x {c['img_size']} x {c['img_size']} px, RGB in [0, 1] normalised with "
        f"mean {c['mean']} and std {c['std']} |",
        f"| tokens | {c.get('num_cls_tokens', 0)} CLS + {n_tok} patch tokens ({t} x {s} x {s}, time-major), "
        f"no final norm |",
        f"| position table | {'learnable' if c.get('pos_learnable', True) else 'fixed sine-cosine'}, "
        f"{c['num_frames']} frames (other frame counts: resampled in time when loaded) |",
        "| weights | `model.safetensors`, float32, `VideoEncoder.state_dict()` names; `config.json`: the "
        "constructor arguments |",
        "",
        "## Source",
        "",
    ]
    src = c.get("source") or {}
    lines += [f"- {k}: `{v}`" for k, v in src.items()] or ["- not recorded"]
    if c.get("not_imported"):
        lines += ["", "Not imported (no counterpart in ivfast's encoder): "
                  + ", ".join(f"`{k}.*` ({n} tensors)" for k, n in c["not_imported"].items()) + "."]
    for note in c.get("notes", []):
        lines.append(f"- note: {note}")
    if c.get("files"):
        lines += ["", "Other files here:", ""] + [f"- `{k}`: {v}" for k, v in c["files"].items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from ivfast.export import from_pretrained",
        "",
        "encoder = from_pretrained(\"THIS_DIRECTORY\")  # eval mode, float32",
        f"video = torch.rand(1, 3, {c['num_frames']}, {c['img_size']}, {c['img_size']})  # RGB in [0, 1]",
        f"mean = torch.tensor({c['mean']}).view(1, 3, 1, 1, 1)",
        f"std = torch.tensor({c['std']}).view(1, 3, 1, 1, 1)",
        "with torch.no_grad():",
        "    out = encoder((video - mean) / std)",
        f"out.patch_tokens  # (1, {n_tok}, {c['width']})",
        f"out.cls_tokens    # (1, {c.get('num_cls_tokens', 0)}, {c['width']})",
        "```",
        "",
        "To start an ivfast training run (Stage 1 or 2) or a probe from it: `model.init_from: THIS_DIRECTORY` in "
        "the run config, or `backbone.export_dir: THIS_DIRECTORY` for `ivfast-probe`.",
        "",
        "## License",
        "",
        f"- Weights: {info.get('license_text') or 'see the source above'}",
        f"- Code: {IVFAST_LICENSE_NOTE}.",
        "",
    ]
    return "\n".join(lines)
