"""The authors' InternVideo-Next checkpoints, read into ivfast's :class:`VideoEncoder` names.

Pure state-dict work (no run config, no trainer): open a checkpoint, unwrap it, tell what it is,
infer the encoder's architecture from the tensors and rename every encoder key.

Files: ``.safetensors``, or a pickle (``.pth``, ``.pt``, ``.bin``, DeepSpeed's
``mp_rank_00_model_states.pt``) read with ``torch.load(weights_only=True)`` only: a pickle that
needs any other global (an ``argparse.Namespace`` saved beside the weights, ...) is refused
(:class:`ReleaseCheckpointError`), nothing from it runs. Wrappers: the state dict may sit under
``module`` (DeepSpeed, the release's Stage-1 saves), ``model`` (the release's non-DeepSpeed
saves), ``state_dict`` / ``model_state_dict`` / ``model_state``, nested; prefixes ``module.``
(DDP) and ``_orig_mod.`` (``torch.compile``) shared by every key are removed.

Kinds (:func:`detect_release_kind`):

- ``"encoder"``: the published encoders (``models/InternVideo_next.py``, class ``InternVideo2``):
  the encoder keys plus the attention-pooling ``clip_projector.*``;
- ``"stage1"``: a Stage-1 training model (``models/InternVideo_next_s1.py``): also
  ``clip_decoder.*``, ``final_clip_decoder.*``, ``clip_pos_embed``, ``diff_pos_embed``,
  ``to_bert_proj.*``, ``bert_mask_token``, ``bert_decoder.*``, ``diffloss.*`` or ``mse_projector.*``;
- ``"stage2"``: a Stage-2 training model (``models/InternVideo_next_s2.py``): ``selfdist_*``
  decoders instead of ``clip_decoder`` / ``diffloss``.

Encoder keys (release -> ivfast), every one mapped, shapes checked (:func:`map_encoder`):

======================================  ======================================  ==========================================
release                                 ivfast                                  how
======================================  ======================================  ==========================================
``patch_embed.proj.weight`` (D,C,t,p,p) ``patch_embed.proj.weight`` (D, C*t*p*p) reshape: Conv3d kernel in patchify's (c, tt, py, px) order
``patch_embed.proj.bias``               ``patch_embed.proj.bias``               as is
``patch_embed.norm_before.weight``      ``patch_embed.norm_in.weight``          permuted: release (tt, py, px, c) -> (c, tt, py, px)
``patch_embed.norm.weight``             ``patch_embed.norm_out.weight``         as is
``cls_token`` (1, n_cls, D)             ``cls_token`` (1, n_cls, D)             as is (absent when n_cls = 0)
``pos_embed`` (1, n_cls + N, D)         ``pos.table`` (n_cls + N, D)            squeeze(0); CLS rows first, then t-major rows
``pos_embed_spatial/_temporal/_cls``    ``pos.table``                           (separable variant) summed into the joint table
``blocks.{i}.norm1.weight``             ``blocks.{i}.norm1.weight``             as is (also DropoutAddRMSNorm's)
``blocks.{i}.attn.qkv.weight``          ``blocks.{i}.attn.qkv.weight``          as is (no qkv bias in the release)
``blocks.{i}.attn.q_norm.weight``       ``blocks.{i}.attn.q_norm.weight``       as is (RMSNorm over the full width)
``blocks.{i}.attn.k_norm.weight``       ``blocks.{i}.attn.k_norm.weight``       as is
``blocks.{i}.attn.proj.{weight,bias}``  ``blocks.{i}.attn.proj.{weight,bias}``  as is
``blocks.{i}.ls1.gamma``                ``blocks.{i}.ls1.gamma``                as is (absent in every block: no LayerScale)
``blocks.{i}.norm2.weight``             ``blocks.{i}.norm2.weight``             as is
``blocks.{i}.mlp.fc{1,2}.{weight,bias}``  ``blocks.{i}.mlp.fc{1,2}.{weight,bias}``  as is (FusedMLP or Mlp: same names)
``blocks.{i}.ls2.gamma``                ``blocks.{i}.ls2.gamma``                as is
======================================  ======================================  ==========================================

Not in ivfast's encoder: ``clip_projector.*`` (the published model's attention-pooling head to
``clip_embed_dim``, used by ``forward(projected=True)``); :func:`import_release_encoder` lists
those keys as not imported. Neither model has a final norm after the blocks.

The head count is not in the weights (q/k norms span the full width): it is taken from the
release's known widths (384: 6, 768: 12, 1024: 16, 1408: 16) or must be given. The frame count
and image size are read from a separable position table, else from the joint table's row
count at the release's 224 px (every published model), else must be given.
"""
from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

__all__ = [
    "ReleaseCheckpointError",
    "ReleaseImport",
    "RELEASE_LICENSE",
    "RELEASE_SOURCE",
    "KNOWN_HEADS",
    "read_release_checkpoint",
    "unwrap_state",
    "find_encoder_prefix",
    "detect_release_kind",
    "encoder_geometry",
    "infer_encoder_kwargs",
    "mlp_ratio_for",
    "map_encoder",
    "import_release_encoder",
]

RELEASE_LICENSE = "apache-2.0"
"""The release's license: Apache License 2.0 (the LICENSE of github.com/OpenGVLab/InternVideo, the
repository InternVideo-Next is published in)."""
RELEASE_SOURCE = "https://github.com/OpenGVLab/InternVideo (InternVideo-Next)"

KNOWN_HEADS = {384: 6, 768: 12, 1024: 16, 1408: 16}
"""Head counts of the release's model definitions by width (small / base / large / 1B)."""
RELEASE_IMG_SIZE = 224  # every published model and training script

WRAPPER_KEYS = ("module", "model", "state_dict", "model_state_dict", "model_state")
SHARED_PREFIXES = ("module.", "_orig_mod.")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")

# Top-level names of the encoder in the release's models (what map_encoder owns).
ENCODER_NAMES = ("patch_embed.", "blocks.", "cls_token", "pos_embed")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Known non-encoder parts of each kind: top-level names (a trailing "." means a module).
PROJECTOR = ("clip_projector.",)
STAGE1_PARTS = PROJECTOR + ("clip_decoder.", "final_clip_decoder.", "to_bert_proj.", "bert_decoder.", "diffloss.",
                            "mse_projector.", "bert_mask_token", "clip_pos_embed", "diff_pos_embed")
STAGE2_PARTS = PROJECTOR + ("to_bert_proj.", "selfdist_decoder.", "selfdist_normproj_decoder.",
                            "selfdist_proj_clip.", "bert_decoder.", "bert_mask_token", "clip_pos_embed",
                            "diff_pos_embed")
KIND_PARTS = {"encoder": PROJECTOR, "stage1": STAGE1_PARTS, "stage2": STAGE2_PARTS}


class ReleaseCheckpointError(ValueError):
    """A release checkpoint that cannot be read or imported as asked; the message names what and where."""


def _short(keys, limit: int = 8) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _has(name: str, parts) -> bool:
    return any(name.startswith(p) if p.endswith(".") else (name == p or name.startswith(p + "_")) for p in parts)


# ----------------------------------------------------------------------------- reading


def _pick_file(path: str) -> str:
    names = sorted(os.listdir(path))
    for name in ("model.safetensors", "pytorch_model.bin", "mp_rank_00_model_states.pt"):
        if name in names:
            return os.path.join(path, name)
    found = [n for n in names if n.endswith((".safetensors",) + _PICKLE_SUFFIXES)]
    if len(found) == 1:
        return os.path.join(path, found[0])
    raise ReleaseCheckpointError(f"{path}: expected model.safetensors, pytorch_model.bin, mp_rank_00_model_states.pt "
                                 f"or exactly one checkpoint file in the directory, found {found or 'none'}")


def read_release_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a release checkpoint (file or directory): unwrapped, shared ``module.`` /
    ``_orig_mod.`` prefixes removed, tensors on the CPU in their stored dtype.

    Pickles are read with ``torch.load(weights_only=True)`` only; one that needs more is refused
    with :class:`ReleaseCheckpointError` (convert it on a trusted machine, see the message).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ReleaseCheckpointError(f"release checkpoint not found: {path}")
    if os.path.isdir(path):
        path = _pick_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj = load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ReleaseCheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
            why = why.split(" Please use")[0].rstrip(".")
            raise ReleaseCheckpointError(
                f"{path}: refused: this pickle needs more than weights-only loading ({why}); no code from it "
                "is run here. On a machine where you trust the file, save its weights alone, e.g. "
                "torch.save(torch.load(p, weights_only=False)['module'], 'weights.pth') or as .safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError) as e:
            raise ReleaseCheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    state = unwrap_state(obj, path)
    for p in SHARED_PREFIXES:
        while state and all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    return state


def _is_state(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap_state(obj, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict inside ``obj``: ``obj`` itself, or under one of
    :data:`WRAPPER_KEYS` (nested up to three deep; the first key present wins, so ``model`` is
    taken over ``model_ema``)."""
    seen = []
    for _ in range(4):
        if _is_state(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if key is None:
            break
        seen.append(key)
        obj = obj[key]
    inside = "/".join(seen) or "top level"
    names = sorted(map(str, obj))[:12] if isinstance(obj, Mapping) else type(obj).__name__
    raise ReleaseCheckpointError(f"{where}: no state dict found (looked under {'/'.join(WRAPPER_KEYS)}; at {inside}: "
                                 f"{names})")


def find_encoder_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The prefix under which the encoder's keys sit ("" for the release's own models; e.g.
    ``vision_encoder.`` in a downstream model), found from ``patch_embed.proj.weight``."""
    hits = sorted(k[: -len("patch_embed.proj.weight")] for k in state if k.endswith("patch_embed.proj.weight"))
    hits = [h for h in hits if h == "" or h.endswith(".")]
    if len(hits) != 1:
        raise ReleaseCheckpointError(
            f"expected exactly one 'patch_embed.proj.weight' (the encoder's patch embedding), found "
            f"{[h + 'patch_embed.proj.weight' for h in hits] or 'none'}")
    return hits[0]


def detect_release_kind(state: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """``"encoder"`` (published encoder), ``"stage1"`` or ``"stage2"`` (training models), from the
    keys beside the encoder's."""
    names = [k[len(prefix):] for k in state if k.startswith(prefix)]
    if prefix + "patch_embed.proj.weight" not in state:
        raise ReleaseCheckpointError(f"no '{prefix}patch_embed.proj.weight': not an InternVideo-Next encoder "
                                     f"(keys: {_short(sorted(state))})")
    if any(n.startswith(("clip_decoder.", "diffloss.", "mse_projector.")) for n in names):
        return "stage1"
    if any(n.startswith("selfdist_") for n in names):
        return "stage2"
    training = [n for n in names if _has(n, STAGE1_PARTS) and not _has(n, PROJECTOR)]
    if training:
        raise ReleaseCheckpointError(
            f"keys of a training model ({_short(training, 4)}) but neither Stage 1's (clip_decoder.*, diffloss.* "
            "or mse_projector.*) nor Stage 2's (selfdist_*): a release model this reader does not know")
    return "encoder"


# ----------------------------------------------------------------------------- architecture


@dataclass
class EncoderGeometry:
    """What the encoder's tensors show: width, depth, MLP hidden size, patch geometry, CLS count,
    position rows, LayerScale, and (separable tables only) the token grid."""

    width: int
    depth: int
    hidden: int
    in_chans: int
    tubelet: int
    patch: int
    num_cls: int
    pos_rows: int  # patch rows of the position table
    layer_scale: bool
    separable: bool
    grid: tuple | None = None  # (t, h, w) from a separable table
    dtypes: list = field(default_factory=list)


def _get(state, key, ndim=None):
    t = state.get(key)
    if t is None:
        raise ReleaseCheckpointError(f"missing release key: {key}")
    if ndim is not None and t.ndim != ndim:
        raise ReleaseCheckpointError(f"{key}: expected {ndim} dims, got shape {tuple(t.shape)}")
    return t


def encoder_geometry(state: Mapping[str, torch.Tensor], prefix: str = "") -> EncoderGeometry:
    """The shapes the encoder's architecture is read from (raises naming the key that lacks)."""
    proj = _get(state, prefix + "patch_embed.proj.weight", 5)
    width, in_chans, tubelet, ph, pw = proj.shape
    if ph != pw:
        raise ReleaseCheckpointError(f"{prefix}patch_embed.proj.weight: non-square patch {ph}x{pw} (ivfast: square)")
    cls = state.get(prefix + "cls_token")
    num_cls = int(cls.shape[1]) if cls is not None and cls.ndim == 3 else 0
    depth = 1 + max((int(m.group(1)) for k in state if k.startswith(prefix)
                     for m in [_BLOCK_RE.match(k[len(prefix):])] if m), default=-1)
    if depth == 0:
        raise ReleaseCheckpointError(f"no '{prefix}blocks.{{i}}.*' keys: the encoder has no blocks")
    hidden = int(_get(state, prefix + "blocks.0.mlp.fc1.weight", 2).shape[0])
    separable = prefix + "pos_embed" not in state and prefix + "pos_embed_spatial" in state
    grid = None
    if separable:
        hw = int(_get(state, prefix + "pos_embed_spatial", 3).shape[1])
        t = int(_get(state, prefix + "pos_embed_temporal", 3).shape[1])
        side = math.isqrt(hw)
        if side * side != hw:
            raise ReleaseCheckpointError(f"{prefix}pos_embed_spatial: {hw} rows is not a square grid")
        grid, pos_rows = (t, side, side), t * hw
    else:
        pos = _get(state, prefix + "pos_embed", 3)
        pos_rows = int(pos.shape[1]) - num_cls
        if pos_rows <= 0:
            raise ReleaseCheckpointError(f"{prefix}pos_embed: {pos.shape[1]} rows for {num_cls} CLS tokens")
    layer_scale = any(k.startswith(prefix + "blocks.") and k.endswith((".ls1.gamma", ".ls2.gamma")) for k in state)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for k, v in state.items()
                     if k.startswith(prefix) and k[len(prefix):].startswith(ENCODER_NAMES)})
    return EncoderGeometry(int(width), depth, hidden, int(in_chans), int(tubelet), int(ph), num_cls, pos_rows,
                           layer_scale, separable, grid, dtypes)


def mlp_ratio_for(width: int, hidden: int) -> float:
    """A ratio r with ``int(width * r) == hidden`` (ivfast's Mlp sizing), as close to hidden/width as floats allow."""
    r = hidden / width
    for _ in range(8):
        if int(width * r) == hidden:
            return r
        r = math.nextafter(r, math.inf)
    raise ReleaseCheckpointError(f"cannot express an MLP of {hidden} for width {width} as int(width * mlp_ratio)")


def infer_encoder_kwargs(state: Mapping[str, torch.Tensor], prefix: str = "", *, heads: int | None = None,
                         num_frames: int | None = None, img_size: int | None = None) -> dict:
    """:class:`VideoEncoder` constructor arguments for the release encoder under ``prefix``.

    Read from the tensors: width, depth, MLP ratio, patch and tubelet size, input channels, CLS
    count, LayerScale (or none), the position table's size. ``heads`` (not in the weights)
    defaults to :data:`KNOWN_HEADS`; ``num_frames`` / ``img_size`` default to a separable
    table's grid or to the release's 224 px. ``gelu`` is "tanh" (the release's fused MLP),
    ``block`` "release", ``pos_learnable`` True, ``drop_path`` 0.0 (not stored; the release
    trained with 0.1).
    """
    g = encoder_geometry(state, prefix)
    if heads is None:
        heads = KNOWN_HEADS.get(g.width)
        if heads is None:
            raise ReleaseCheckpointError(
                f"the head count is not in the weights and width {g.width} is none of the release's "
                f"({', '.join(f'{w}: {h}' for w, h in KNOWN_HEADS.items())}): give the head count (ivfast-export --heads N; heads= in Python)")
    if g.width % heads:
        raise ReleaseCheckpointError(f"width {g.width} is not divisible by heads={heads}")
    if g.grid is not None:
        t, h, w = g.grid
        if img_size is not None and img_size != h * g.patch:
            raise ReleaseCheckpointError(f"img_size={img_size} but the position table is for {h * g.patch} px")
        if num_frames is not None and num_frames != t * g.tubelet:
            raise ReleaseCheckpointError(f"num_frames={num_frames} but the position table is for {t * g.tubelet}")
        img_size, num_frames = h * g.patch, t * g.tubelet
    else:
        rows = g.pos_rows
        if img_size is None and num_frames is None:
            side = RELEASE_IMG_SIZE // g.patch
            if RELEASE_IMG_SIZE % g.patch or rows % (side * side):
                raise ReleaseCheckpointError(
                    f"the position table's {rows} patch rows are no whole number of {RELEASE_IMG_SIZE} px frames "
                    f"(patch {g.patch}): give the frame count or image size (ivfast-export --frames T / --img-size S; num_frames=, img_size= in Python)")
            img_size = RELEASE_IMG_SIZE
        if img_size is not None:
            if img_size % g.patch:
                raise ReleaseCheckpointError(f"img_size={img_size} is not a multiple of the patch {g.patch}")
            side = img_size // g.patch
            if rows % (side * side):
                raise ReleaseCheckpointError(f"the position table's {rows} patch rows do not fit {img_size} px "
                                             f"({side}x{side} patches per frame)")
            t = rows // (side * side)
            if num_frames is not None and num_frames != t * g.tubelet:
                raise ReleaseCheckpointError(f"num_frames={num_frames} and img_size={img_size} need "
                                             f"{num_frames // g.tubelet * side * side} position rows, the table has {rows}")
            num_frames = t * g.tubelet
        else:
            if num_frames % g.tubelet or rows % (num_frames // g.tubelet):
                raise ReleaseCheckpointError(f"the position table's {rows} patch rows do not fit {num_frames} frames")
            hw = rows // (num_frames // g.tubelet)
            side = math.isqrt(hw)
            if side * side != hw:
                raise ReleaseCheckpointError(f"{num_frames} frames leave {hw} rows per frame: not a square grid")
            img_size = side * g.patch
    return dict(img_size=int(img_size), patch_size=g.patch, num_frames=int(num_frames), tubelet_size=g.tubelet,
                in_chans=g.in_chans, width=g.width, depth=g.depth, heads=int(heads),
                mlp_ratio=mlp_ratio_for(g.width, g.hidden), block="release", num_cls_tokens=g.num_cls,
                layer_scale_init=1e-5 if g.layer_scale else None, drop_path=0.0, pos_learnable=True, gelu="tanh")


# ----------------------------------------------------------------------------- mapping


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.is_floating_point() else t.detach()


def map_encoder(state: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(ivfast VideoEncoder state dict (fp32), the release keys consumed)`` for the encoder under
    ``prefix``. Every key of the encoder's namespace (``patch_embed.*``, ``cls_token``,
    ``pos_embed*``, ``blocks.*``) must map: a missing one, one that maps to nothing (e.g. a
    qkv bias) or a shape that does not fit raises :class:`ReleaseCheckpointError` (a
    ValueError) naming them. Keys outside that namespace are left to the caller.
    """
    g = encoder_geometry(state, prefix)
    d, p, tt, c = g.width, g.patch, g.tubelet, g.in_chans
    patch_dim = c * tt * p * p
    out: dict[str, torch.Tensor] = {}
    consumed: list[str] = []
    missing: list[str] = []
    bad: list[str] = []

    def take(name: str, dest: str, shape: tuple, fn=None):
        key = prefix + name
        t = state.get(key)
        if t is None:
            missing.append(key)
            return
        consumed.append(key)
        if tuple(t.shape) != tuple(shape):
            bad.append(f"{key}: {tuple(t.shape)}, expected {tuple(shape)}")
            return
        out[dest] = _fp32(fn(t) if fn is not None else t)

    take("patch_embed.proj.weight", "patch_embed.proj.weight", (d, c, tt, p, p), lambda t: t.reshape(d, patch_dim))
    take("patch_embed.proj.bias", "patch_embed.proj.bias", (d,))
    # The release norms the tubelet flattened as (tt, py, px, c); patchify's order is (c, tt, py, px).
    take("patch_embed.norm_before.weight", "patch_embed.norm_in.weight", (patch_dim,),
         lambda t: t.reshape(tt, p, p, c).permute(3, 0, 1, 2).reshape(patch_dim))
    take("patch_embed.norm.weight", "patch_embed.norm_out.weight", (d,))
    if g.num_cls or prefix + "cls_token" not in state:
        take("cls_token", "cls_token", (1, g.num_cls, d))
    else:
        consumed.append(prefix + "cls_token")  # (1, 0, D): no CLS tokens
    if g.separable:
        t_, h_, w_ = g.grid
        parts = {}
        for name, shape in (("pos_embed_spatial", (1, h_ * w_, d)), ("pos_embed_temporal", (1, t_, d)),
                            ("pos_embed_cls", None)):
            key = prefix + name
            if key not in state:
                missing.append(key)
                continue
            consumed.append(key)
            if shape is not None and tuple(state[key].shape) != shape:
                bad.append(f"{key}: {tuple(state[key].shape)}, expected {shape}")
            parts[name] = state[key]
        if len(parts) == 3 and not bad:
            cls_rows = parts["pos_embed_cls"][0]
            if cls_rows.shape != (g.num_cls, d) and not (g.num_cls and cls_rows.shape == (1, d)):
                bad.append(f"{prefix}pos_embed_cls: {tuple(parts['pos_embed_cls'].shape)} for {g.num_cls} CLS tokens")
            else:
                cls_rows = cls_rows.expand(g.num_cls, d) if g.num_cls != cls_rows.shape[0] else cls_rows
                # spatial repeated over time + temporal repeated over space, t-major (the release's forward)
                patch_rows = (parts["pos_embed_spatial"][0].float().repeat(t_, 1)
                              + parts["pos_embed_temporal"][0].float().repeat_interleave(h_ * w_, dim=0))
                out["pos.table"] = torch.cat([cls_rows.float(), patch_rows], dim=0)
    else:
        take("pos_embed", "pos.table", (1, g.num_cls + g.pos_rows, d), lambda t: t[0])

    hidden = g.hidden
    block_parts = {
        "norm1.weight": (d,), "attn.qkv.weight": (3 * d, d), "attn.q_norm.weight": (d,), "attn.k_norm.weight": (d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "mlp.fc1.weight": (hidden, d),
        "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,),
    }
    if g.layer_scale:
        block_parts.update({"ls1.gamma": (d,), "ls2.gamma": (d,)})
    for i in range(g.depth):
        for part, shape in block_parts.items():
            take(f"blocks.{i}.{part}", f"blocks.{i}.{part}", shape)

    taken = set(consumed)
    unexpected = sorted(k for k in state if k.startswith(prefix) and k[len(prefix):].startswith(ENCODER_NAMES)
                        and k not in taken)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} encoder key(s) with no place in ivfast's encoder: {_short(unexpected)}"
                        + (" (ivfast's release-style attention has no qkv bias)"
                           if any(k.endswith("attn.qkv.bias") for k in unexpected) else ""))
    if bad:
        problems.append(f"{len(bad)} shape(s) that do not fit: {'; '.join(bad[:6])}")
    if problems:
        raise ReleaseCheckpointError("release encoder does not map onto ivfast's VideoEncoder: " + "; ".join(problems))
    return out, consumed


# ----------------------------------------------------------------------------- a whole checkpoint


@dataclass
class ReleaseImport:
    """The encoder of a release checkpoint in ivfast's names, and what was left out.

    ``not_imported``: release keys of known parts that ivfast's encoder does not have (the
    attention-pooling ``clip_projector.*``; a training model's decoders, predictor, ...),
    each listed. ``notes``: facts worth a line in a report or model card.
    """

    kind: str
    prefix: str
    encoder_kwargs: dict
    encoder_state: dict
    consumed: list
    not_imported: list
    source_dtypes: list
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        groups = sorted({k[len(self.prefix):].split(".")[0] for k in self.not_imported})
        return (f"release {self.kind} (prefix '{self.prefix}', {'/'.join(self.source_dtypes)}): "
                f"{len(self.consumed)} encoder tensors -> {len(self.encoder_state)} ivfast tensors; "
                f"not imported: {len(self.not_imported)} tensors ({', '.join(groups) or 'none'})")


def import_release_encoder(state: Mapping[str, torch.Tensor], *, prefix: str | None = None, heads: int | None = None,
                           num_frames: int | None = None, img_size: int | None = None) -> ReleaseImport:
    """The encoder of a whole release checkpoint (:func:`read_release_checkpoint`'s dict).

    Every key must be the encoder's (mapped by :func:`map_encoder`) or belong to a known part
    of the detected kind (:data:`KIND_PARTS`, listed in ``not_imported``); any other key stops
    the import with :class:`ReleaseCheckpointError` naming it.
    """
    if prefix is None:
        prefix = find_encoder_prefix(state)
    kind = detect_release_kind(state, prefix)
    kwargs = infer_encoder_kwargs(state, prefix, heads=heads, num_frames=num_frames, img_size=img_size)
    enc_state, consumed = map_encoder(state, prefix)
    taken = set(consumed)
    parts = KIND_PARTS[kind]
    not_imported, unexpected = [], []
    for k in state:
        if k in taken:
            continue
        if k.startswith(prefix) and _has(k[len(prefix):], parts):
            not_imported.append(k)
        else:
            unexpected.append(k)
    if unexpected:
        raise ReleaseCheckpointError(
            f"{len(unexpected)} key(s) of this {kind} checkpoint belong to no part ivfast knows "
            f"(known besides the encoder: {', '.join(p.rstrip('.') for p in parts)}): {_short(sorted(unexpected))}")
    g = encoder_geometry(state, prefix)
    notes = []
    if any(k[len(prefix):].startswith("clip_projector.") for k in not_imported):
        notes.append("clip_projector.* (attention pooling to the release's clip_embed_dim, its forward(projected=True)) "
                     "has no counterpart in ivfast's VideoEncoder and is not imported")
    if g.separable:
        notes.append("separable position table (pos_embed_spatial/temporal/cls) summed into ivfast's joint table")
    if heads is None:
        notes.append(f"heads={kwargs['heads']}: the release's head count for width {g.width} (not stored in the weights)")
    if g.dtypes != ["float32"]:
        notes.append(f"weights stored as {'/'.join(g.dtypes)}, imported as float32")
    return ReleaseImport(kind, prefix, kwargs, enc_state, consumed, not_imported, g.dtypes, notes)
