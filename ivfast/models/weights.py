"""Real weights from local safetensors files (no hub, never unpickled).

- :func:`load_siglip_teacher`: a SigLIP / SigLIP2 vision tower into :class:`SigLIPTeacher`,
  from the HF transformers layout (``vision_model.embeddings.patch_embedding.weight``,
  ``vision_model.encoder.layers.{i}.self_attn.q_proj.weight``, ..., ``vision_model.head.*``;
  any prefix, including none) or the timm / big_vision layout (``patch_embed.proj.weight``,
  ``pos_embed``, ``blocks.{i}.attn.qkv.weight``, ..., ``norm``, ``attn_pool.*``; any prefix,
  e.g. open_clip's ``visual.trunk.``).
- :func:`load_modernbert_predictor`: the last (or chosen) layers of a ModernBERT checkpoint
  (HF layout ``model.layers.{i}.attn.Wqkv.weight``, ...) into :class:`Predictor`'s layers.

Both detect the layout, map every key, check every shape before writing anything, and
return a :class:`LoadReport`. A missing required key, a shape mismatch, a checkpoint with
more layers than the model (unless ``allow_truncate``), or (with ``strict``, the default) a
key of the loaded part that maps to nothing raises :class:`WeightLoadError`; the model is
then left untouched. Keys of other parts (the text tower, logit scale/bias, ModernBERT's
embeddings and MLM head) are ignored and counted. A ``config.json`` beside the file, when
present, is read to check what weights cannot show (the number of heads).

Paths: a ``.safetensors`` file, a ``.safetensors.index.json`` (sharded), or a directory
holding ``model.safetensors`` or ``model.safetensors.index.json``. Anything else (``.bin``,
``.pt``, ``.pth``, ``.ckpt``: pickles) is refused.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

__all__ = [
    "WeightLoadError",
    "WeightLoadWarning",
    "LoadReport",
    "load_siglip_teacher",
    "load_modernbert_predictor",
    "open_safetensors",
]


class WeightLoadError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what and where."""


class WeightLoadWarning(UserWarning):
    """Something loaded, but not exactly as the checkpoint's own model would run it."""


@dataclass
class LoadReport:
    """What a load did.

    loaded: our parameter names that were written. missing: optional checkpoint keys that
    were absent (our parameter kept as initialised). unexpected: checkpoint keys in the
    loaded part that map to nothing (only with ``strict=False``; strict raises). ignored:
    keys of other parts (text tower, embeddings, MLM head, ...). truncated / skipped_layers:
    keys of checkpoint layers that were not taken. kept: our parameters deliberately not
    loaded. layer_map: our layer index -> checkpoint layer index. interpolated: key -> (t_old,
    t_new) for position tables resampled in time. notes: the warnings issued.
    """

    path: str
    layout: str
    prefix: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    truncated: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    layer_map: dict = field(default_factory=dict)
    interpolated: dict = field(default_factory=dict)
    checkpoint_layers: int = 0
    source_dtypes: list = field(default_factory=list)
    config_checked: bool = False
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        layers = sorted(self.layer_map.items())
        span = f"layers {layers[0][1]}..{layers[-1][1]} of {self.checkpoint_layers}" if layers else "no layers"
        return (f"loaded {len(self.loaded)} tensors ({self.layout} layout, prefix '{self.prefix}', {span}, "
                f"dtype {'/'.join(self.source_dtypes) or '-'}) from {self.path}; missing {len(self.missing)}, "
                f"unexpected {len(self.unexpected)}, ignored {len(self.ignored)}, not taken {len(self.truncated)}, "
                f"kept as initialised {len(self.kept)}")


# ----------------------------------------------------------------------------- reading safetensors

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar", ".zip", ".npz", ".npy", ".msgpack", ".h5")


def _refuse(path: str, why: str):
    return WeightLoadError(
        f"{path}: safetensors only: {why}. Checkpoints in pickle formats (.bin, .pt, .pth, .ckpt) are never "
        f"unpickled here; convert the file to .safetensors on a trusted machine first"
    )


def _resolve_files(path: str) -> tuple[list[str], dict | None]:
    """(safetensors files, weight_map or None)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "model.safetensors.index.json"):
            if os.path.isfile(os.path.join(path, name)):
                return _resolve_files(os.path.join(path, name))
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) == 1:
            return _resolve_files(os.path.join(path, found[0]))
        pickles = [f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES)]
        if not found and pickles:
            raise _refuse(path, f"the directory holds only {', '.join(sorted(pickles)[:3])}")
        raise WeightLoadError(f"{path}: expected model.safetensors, model.safetensors.index.json or exactly one "
                              f"*.safetensors file in the directory, found {found or 'none'}")
    low = path.lower()
    if low.endswith(".safetensors.index.json"):
        if not os.path.isfile(path):
            raise WeightLoadError(f"{path}: no such file")
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightLoadError(f"{path}: not a safetensors index (a JSON with 'weight_map'): {e}") from None
        base = os.path.dirname(path)
        files = sorted({os.path.join(base, v) for v in weight_map.values()})
        for f in files:
            if not f.lower().endswith(".safetensors"):
                raise _refuse(f, "the index points at a non-safetensors shard")
        return files, {k: os.path.join(base, v) for k, v in weight_map.items()}
    if not low.endswith(".safetensors"):
        if low.endswith(_PICKLE_SUFFIXES):
            raise _refuse(path, f"'{os.path.splitext(path)[1]}' files are pickles")
        raise _refuse(path, "expected a .safetensors file, a .safetensors.index.json or a directory")
    return [path], None


class SafetensorsCheckpoint:
    """Lazy read access to the tensors of one or more safetensors files (shapes without
    loading, one tensor at a time)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = os.fspath(path)
        files, weight_map = _resolve_files(self.path)
        self._handles = {}
        self._where: dict[str, str] = {}
        try:
            for f in files:
                if not os.path.isfile(f):
                    raise WeightLoadError(f"{f}: no such file")
                with open(f, "rb") as fh:
                    head = fh.read(8)
                if head[:2] == b"PK" or head[:1] == b"\x80":
                    raise _refuse(f, "the file is a pickle / torch zip archive despite its name")
                try:
                    h = safe_open(f, framework="pt", device="cpu")
                except Exception as e:
                    raise WeightLoadError(f"{f}: not a valid safetensors file ({type(e).__name__}: {e})") from None
                self._handles[f] = h
                for k in h.keys():
                    self._where[k] = f
        except BaseException:
            self.close()
            raise
        if weight_map is not None:
            absent = [k for k in weight_map if k not in self._where]
            if absent:
                raise WeightLoadError(f"{self.path}: {len(absent)} keys of the index are in no shard, e.g. {absent[:3]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._handles[self._where[key]].get_slice(key).get_dtype())

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def config(self) -> dict | None:
        """``config.json`` beside the checkpoint, if present and readable."""
        base = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        cfg = os.path.join(base, "config.json")
        if not os.path.isfile(cfg):
            return None
        try:
            with open(cfg) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_safetensors(path: str) -> SafetensorsCheckpoint:
    """Open a local safetensors checkpoint (file, sharded index or directory); refuses pickles."""
    return SafetensorsCheckpoint(path)


# ----------------------------------------------------------------------------- plans


@dataclass
class _Piece:
    """One checkpoint tensor: its key, the shapes it may have, and where it goes:
    ``writes`` = [(our parameter, rows of it (dim 0) or None for all, function of the
    checkpoint tensor giving the value)]."""

    key: str
    shapes: tuple
    writes: list
    optional: bool = False


def _all(param_name: str, fn: Callable | None = None):
    return (param_name, None, fn or (lambda t: t))


def _rows(param_name: str, start: int, stop: int, fn: Callable):
    return (param_name, slice(start, stop), fn)


def _format_keys(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_coverage(model: nn.Module, pieces: list[_Piece], targets: set[str]) -> None:
    """A self-check of a plan: every target parameter written exactly once over its rows."""
    params = dict(model.named_parameters())
    rows: dict[str, int] = {}
    for p in pieces:
        for name, sl, _ in p.writes:
            n = params[name].shape[0] if params[name].dim() else 1
            rows[name] = rows.get(name, 0) + (len(range(*sl.indices(n))) if sl is not None else n)
    bad = [t for t in targets if rows.get(t, 0) != (params[t].shape[0] if params[t].dim() else 1)]
    if bad:
        raise AssertionError(f"internal error: key plan does not cover {bad}")


def _verify(ck: SafetensorsCheckpoint, pieces: list[_Piece], what: str) -> tuple[list, list]:
    """Check presence and shapes of every piece; returns (present pieces, missing optional keys);
    raises on a missing required key or a wrong shape (all problems in one message)."""
    missing, mismatched, present, optional_missing = [], [], [], []
    for p in pieces:
        if p.key not in ck:
            (optional_missing if p.optional else missing).append(p.key)
            continue
        shape = ck.shape(p.key)
        if shape not in p.shapes:
            want = " or ".join(str(s) for s in p.shapes)
            mismatched.append(f"{p.key}: checkpoint {shape}, {what} needs {want} (for {p.writes[0][0]})")
            continue
        present.append(p)
    problems = []
    if missing:
        problems.append(f"{len(missing)} required keys missing: {_format_keys(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:8])
                        + (f" (+{len(mismatched) - 8} more)" if len(mismatched) > 8 else ""))
    if problems:
        raise WeightLoadError(f"{ck.path}: cannot load into the {what}: " + " | ".join(problems))
    return present, optional_missing


@torch.no_grad()
def _write(ck: SafetensorsCheckpoint, pieces: list[_Piece], model: nn.Module) -> tuple[list, list]:
    params = dict(model.named_parameters())
    written, dtypes = [], set()
    for p in pieces:
        t = ck.get(p.key)
        dtypes.add(str(t.dtype).replace("torch.", ""))
        for name, sl, fn in p.writes:
            dst = params[name]
            val = fn(t)
            target = dst if sl is None else dst[sl]
            if tuple(val.shape) != tuple(target.shape):  # guarded by _verify; a plan bug otherwise
                raise AssertionError(f"internal error: {p.key} -> {name}: {tuple(val.shape)} vs {tuple(target.shape)}")
            target.copy_(val.to(dtype=dst.dtype))
            if name not in written:
                written.append(name)
    return written, sorted(dtypes)


def _note(report: LoadReport, msg: str) -> None:
    report.notes.append(msg)
    warnings.warn(msg, WeightLoadWarning, stacklevel=3)


def _unique_prefix(keys: Sequence[str], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return sorted({m.group(1) for k in keys for m in [rx.match(k)] if m})


# ----------------------------------------------------------------------------- SigLIP

# keys outside the vision tower that a full SigLIP checkpoint carries (when the vision tower has no prefix)
_OTHER_TOWERS = ("text_model.", "text.", "text_decoder.", "logit_scale", "logit_bias", "text_projection",
                 "token_embedding.", "positional_embedding", "transformer.", "ln_final.")
_SIGLIP_BENIGN = ("embeddings.position_ids",)


def _siglip_layout(keys: Sequence[str]) -> tuple[str, str]:
    hf = _unique_prefix(keys, r"^(.*)embeddings\.patch_embedding\.weight$")
    timm = _unique_prefix(keys, r"^(.*)patch_embed\.proj\.weight$")
    found = [("hf", p) for p in hf] + [("timm", p) for p in timm]
    if len(found) == 1:
        return found[0]
    if not found:
        raise WeightLoadError(
            "no SigLIP vision tower found: expected an HF layout key '[vision_model.]embeddings.patch_embedding.weight' "
            "or a timm layout key '[prefix]patch_embed.proj.weight'")
    raise WeightLoadError(f"ambiguous checkpoint: several vision towers found ({found}); pass a file with one")


def _siglip_hf_pieces(teacher, prefix: str) -> list[_Piece]:
    pieces = []
    p = teacher.patch_size
    for name, param in teacher.named_parameters():
        shape = tuple(param.shape)
        if name == "embeddings.patch_embedding.weight":
            d = shape[0]
            # SigLIP2 NaFlex: a Linear over patches flattened as (ph, pw, c)
            naflex = lambda t, d=d: t.reshape(d, p, p, 3).permute(0, 3, 1, 2)
            conv_or_linear = lambda t, f=naflex: f(t) if t.dim() == 2 else t
            pieces.append(_Piece(prefix + name, (shape, (d, 3 * p * p)), [_all(name, conv_or_linear)]))
        else:
            pieces.append(_Piece(prefix + name, (shape,), [_all(name)]))
    return pieces


def _siglip_timm_pieces(teacher, prefix: str) -> list[_Piece]:
    d = teacher.width
    sd = {n: tuple(p.shape) for n, p in teacher.named_parameters()}
    pieces = [
        _Piece(prefix + "patch_embed.proj.weight", (sd["embeddings.patch_embedding.weight"],),
               [_all("embeddings.patch_embedding.weight")]),
        _Piece(prefix + "patch_embed.proj.bias", (sd["embeddings.patch_embedding.bias"],),
               [_all("embeddings.patch_embedding.bias")]),
        _Piece(prefix + "pos_embed", ((1,) + sd["embeddings.position_embedding.weight"],),
               [_all("embeddings.position_embedding.weight", lambda t: t[0])]),
    ]
    for i in range(teacher.depth):
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}blocks.{i}."
        simple = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                  "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for t_name, o_name in simple.items():
            for kind in ("weight", "bias"):
                pieces.append(_Piece(f"{theirs}{t_name}.{kind}", (sd[f"{ours}{o_name}.{kind}"],),
                                     [_all(f"{ours}{o_name}.{kind}")]))
        for kind in ("weight", "bias"):
            qkv_shape = (3 * d,) + sd[f"{ours}self_attn.q_proj.{kind}"][1:]
            writes = [_all(f"{ours}self_attn.{w}_proj.{kind}", lambda t, j=j: t[j * d:(j + 1) * d])
                      for j, w in enumerate("qkv")]
            pieces.append(_Piece(f"{theirs}attn.qkv.{kind}", (qkv_shape,), writes))
    pool = prefix + "attn_pool."
    for kind in ("weight", "bias"):
        in_shape = sd[f"head.attention.in_proj_{kind}"]
        pieces.append(_Piece(f"{pool}q.{kind}", ((d,) + in_shape[1:],),
                             [_rows(f"head.attention.in_proj_{kind}", 0, d, lambda t: t)]))
        pieces.append(_Piece(f"{pool}kv.{kind}", ((2 * d,) + in_shape[1:],),
                             [_rows(f"head.attention.in_proj_{kind}", d, 3 * d, lambda t: t)]))
    for t_name, o_name in {"proj": "head.attention.out_proj", "norm": "head.layernorm",
                           "mlp.fc1": "head.mlp.fc1", "mlp.fc2": "head.mlp.fc2"}.items():
        for kind in ("weight", "bias"):
            pieces.append(_Piece(f"{pool}{t_name}.{kind}", (sd[f"{o_name}.{kind}"],), [_all(f"{o_name}.{kind}")]))
    pieces.append(_Piece(pool + "latent", (sd["head.probe"],), [_all("head.probe")]))
    for kind in ("weight", "bias"):
        pieces.append(_Piece(f"{prefix}norm.{kind}", (sd[f"post_layernorm.{kind}"],), [_all(f"post_layernorm.{kind}")]))
    return pieces


def _check_siglip_config(ck: SafetensorsCheckpoint, teacher, report: LoadReport) -> None:
    cfg = ck.config()
    if cfg is None:
        return
    vc = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else cfg  # full model or tower
    if isinstance(cfg.get("model_args"), dict):  # a timm hub config may carry the model's arguments
        vc = {"num_attention_heads": cfg["model_args"].get("num_heads")}
    heads = vc.get("num_attention_heads")
    if heads is None:
        return
    report.config_checked = True
    if int(heads) != teacher.heads:
        raise WeightLoadError(f"{ck.path}: config.json says {heads} attention heads, the teacher has {teacher.heads} "
                              f"(set model.teacher.heads = {heads})")
    act = vc.get("hidden_act")
    if act is not None and act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        _note(report, f"weights: config.json hidden_act is '{act}'; the teacher's MLP uses tanh-approximated GELU")
    eps = vc.get("layer_norm_eps")
    if eps is not None and abs(float(eps) - 1e-6) > 1e-12:
        _note(report, f"weights: config.json layer_norm_eps is {eps}; the teacher's LayerNorms use 1e-6")


def load_siglip_teacher(teacher, path: str, *, allow_truncate: bool = False, strict: bool = True) -> LoadReport:
    """Load a SigLIP / SigLIP2 vision tower from a local safetensors checkpoint into ``teacher``
    (a :class:`~ivfast.models.teacher.SigLIPTeacher`).

    Layouts: HF transformers (``[prefix]embeddings.patch_embedding.weight``, ``encoder.layers.{i}.*``,
    ``post_layernorm``, ``head.*``; the conv patch embedding, or SigLIP2 NaFlex's Linear one over
    (ph, pw, c)-flattened patches) and timm (``[prefix]patch_embed.proj``, ``pos_embed`` (1, L, D),
    ``blocks.{i}.attn.qkv`` split into q/k/v, ``norm``, ``attn_pool.{latent,q,kv,proj,norm,mlp}``).
    Loads the first ``teacher.depth`` layers; a checkpoint with more layers is an error unless
    ``allow_truncate``. Keys outside the vision tower are ignored and counted; with ``strict``
    (default) an unknown key inside it is an error, else it is reported as unexpected.
    Nothing is written unless every check passes.
    """
    with open_safetensors(path) as ck:
        keys = ck.keys()
        layout, prefix = _siglip_layout(keys)
        report = LoadReport(path=ck.path, layout=layout, prefix=prefix)
        layer_rx = re.compile(re.escape(prefix) + (r"encoder\.layers\.(\d+)\." if layout == "hf" else r"blocks\.(\d+)\."))
        ids = sorted({int(m.group(1)) for k in keys for m in [layer_rx.match(k)] if m})
        n_layers = ids[-1] + 1 if ids else 0
        report.checkpoint_layers = n_layers
        if n_layers < teacher.depth:
            raise WeightLoadError(f"{ck.path}: the checkpoint has {n_layers} layers, the teacher {teacher.depth}: "
                                  f"set model.teacher.depth <= {n_layers}")
        if n_layers > teacher.depth and not allow_truncate:
            raise WeightLoadError(f"{ck.path}: the checkpoint has {n_layers} layers, the teacher only {teacher.depth}; "
                                  f"pass allow_truncate=True to load the first {teacher.depth} (or set model.teacher.depth "
                                  f"= {n_layers})")
        pieces = _siglip_hf_pieces(teacher, prefix) if layout == "hf" else _siglip_timm_pieces(teacher, prefix)
        _check_coverage(teacher, pieces, {n for n, _ in teacher.named_parameters()})
        planned = {p.key for p in pieces}
        unexpected = []
        for k in keys:
            if k in planned:
                continue
            if not k.startswith(prefix) or (prefix == "" and k.startswith(_OTHER_TOWERS)):
                report.ignored.append(k)
                continue
            m = layer_rx.match(k)
            if m and int(m.group(1)) >= teacher.depth:
                report.truncated.append(k)
            elif k[len(prefix):] in _SIGLIP_BENIGN:
                report.ignored.append(k)
            else:
                unexpected.append(k)
        if unexpected and strict:
            raise WeightLoadError(f"{ck.path}: {len(unexpected)} keys of the vision tower map to nothing in the teacher "
                                  f"(a different architecture?): {_format_keys(unexpected)}; pass strict=False to "
                                  f"load anyway")
        present, report.missing = _verify(ck, pieces, "teacher")
        _check_siglip_config(ck, teacher, report)
        report.unexpected = unexpected
        report.layer_map = {i: i for i in range(teacher.depth)}
        report.loaded, report.source_dtypes = _write(ck, present, teacher)
    if unexpected:
        _note(report, f"weights: {len(unexpected)} unexpected keys left unused: {_format_keys(unexpected)}")
    return report


# ----------------------------------------------------------------------------- ModernBERT

_MB_LAYER_KEYS = ("attn_norm.weight", "attn.Wqkv.weight", "attn.Wo.weight", "mlp_norm.weight", "mlp.Wi.weight",
                  "mlp.Wo.weight")


def _modernbert_rope_thetas(cfg: dict) -> dict:
    """{"global": theta, "local": theta, "global_type": rope_type, "local_type": rope_type}, each
    present only when config.json says it. transformers >= 5 writes ``rope_parameters``
    (``{"full_attention": {"rope_theta", "rope_type"}, "sliding_attention": {...}}``) instead of
    the older ``global_rope_theta`` / ``local_rope_theta``; both are read (the newer first)."""
    out = {}
    rp = cfg.get("rope_parameters")
    for kind, layer_type, legacy in (("global", "full_attention", "global_rope_theta"),
                                     ("local", "sliding_attention", "local_rope_theta")):
        entry = rp.get(layer_type) if isinstance(rp, dict) else None
        if isinstance(entry, dict):
            if entry.get("rope_theta") is not None:
                out[kind] = float(entry["rope_theta"])
            if entry.get("rope_type") is not None:
                out[kind + "_type"] = str(entry["rope_type"])
        if kind not in out and cfg.get(legacy) is not None:
            out[kind] = float(cfg[legacy])
    return out


def _check_modernbert_config(ck, predictor, report: LoadReport) -> Callable[[int], bool]:
    """Checks against config.json; returns ``is_global(checkpoint layer id)``: the checkpoint's
    attention pattern. transformers >= 5 writes the pattern as ``layer_types`` (one
    ``"full_attention"`` / ``"sliding_attention"`` per layer, not necessarily periodic) and the
    RoPE thetas inside ``rope_parameters``; older configs carry ``global_attn_every_n_layers``
    (layer i global when i % n == 0; 3 by default, also when there is no config.json) and
    ``global_rope_theta`` / ``local_rope_theta``."""
    cfg = ck.config() or {}
    every = int(cfg.get("global_attn_every_n_layers", 3) or 3)
    types = cfg.get("layer_types")
    if isinstance(types, list) and all(t in ("full_attention", "sliding_attention") for t in types):
        def is_global(cid: int, types=types, every=every) -> bool:
            return types[cid] == "full_attention" if cid < len(types) else cid % every == 0
    else:
        def is_global(cid: int, every=every) -> bool:
            return cid % every == 0
    if not cfg:
        return is_global
    report.config_checked = True
    heads = cfg.get("num_attention_heads")
    if heads is not None and int(heads) != predictor.heads:
        raise WeightLoadError(f"{ck.path}: config.json says {heads} attention heads, the predictor has "
                              f"{predictor.heads} (set model.predictor.heads = {heads})")
    local = cfg.get("local_attention")
    if local is not None and int(local) != predictor.window:
        _note(report, f"weights: config.json local_attention is {local}, the predictor's window {predictor.window}")
    thetas = _modernbert_rope_thetas(cfg)
    for kind, is_g in (("global", True), ("local", False)):
        got = thetas.get(kind)
        want = [l.rope_theta for l in predictor.layers if l.is_global == is_g]
        if got is not None and want and any(abs(got - w) > 1e-6 * max(1.0, w) for w in want):
            _note(report, f"weights: config.json {kind} RoPE theta is {got}, the predictor uses {sorted(set(want))}")
        rope_type = thetas.get(kind + "_type", "default")
        if want and rope_type != "default":
            _note(report, f"weights: config.json {kind} RoPE type is '{rope_type}'; the predictor's RoPE is the "
                          f"default (unscaled) one")
    eps = cfg.get("norm_eps")
    if eps is not None and predictor.layers and abs(float(eps) - predictor.layers[0].attn_norm.eps) > 1e-12:
        _note(report, f"weights: config.json norm_eps is {eps}, the predictor's {predictor.layers[0].attn_norm.eps}")
    act = cfg.get("hidden_activation")
    if act is not None and act != "gelu":
        _note(report, f"weights: config.json hidden_activation is '{act}', the predictor's GeGLU uses exact GELU")
    return is_global


def load_modernbert_predictor(predictor, path: str, layers="last", *, strict: bool = True) -> LoadReport:
    """Load ModernBERT layers from a local safetensors checkpoint into ``predictor.layers``.

    ``layers``: ``"last"`` (the checkpoint's last ``len(predictor.layers)`` layers) or the
    checkpoint layer ids to take, one per predictor layer. A taken layer id that differs from
    the predictor's own id (``first_layer_id + i``) is loaded with a warning, since the
    predictor decides global/local attention and RoPE theta from its own ids; and so is a
    checkpoint whose global/local pattern (config.json ``layer_types``, else
    ``global_attn_every_n_layers``, else every 3rd) differs from the predictor's at the taken
    layers, ids equal or not. ModernBERT's layer 0 has no ``attn_norm`` (Identity): taking it
    keeps our LayerNorm, with a warning.
    ``predictor.in_proj`` is never loaded (it stays as initialised). Embeddings, final norm
    and MLM head of the checkpoint are ignored and counted.
    """
    with open_safetensors(path) as ck:
        keys = ck.keys()
        prefixes = _unique_prefix(keys, r"^(.*?)layers\.\d+\.attn\.Wqkv\.weight$")
        if len(prefixes) != 1:
            raise WeightLoadError(f"{ck.path}: " + ("no ModernBERT layers found (expected keys like "
                                                    "'model.layers.{i}.attn.Wqkv.weight')" if not prefixes else
                                                    f"several ModernBERT layer stacks found (prefixes {prefixes})"))
        prefix = prefixes[0]
        report = LoadReport(path=ck.path, layout="modernbert", prefix=prefix)
        layer_rx = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
        ids = sorted({int(m.group(1)) for k in keys for m in [layer_rx.match(k)] if m})
        report.checkpoint_layers = len(ids)
        depth = len(predictor.layers)
        if isinstance(layers, str):
            if layers != "last":
                raise ValueError(f"layers must be 'last' or a list of checkpoint layer ids, got {layers!r}")
            if len(ids) < depth:
                raise WeightLoadError(f"{ck.path}: the checkpoint has {len(ids)} layers, the predictor needs {depth}")
            taken = ids[-depth:]
        else:
            taken = [int(i) for i in layers]
            if len(taken) != depth:
                raise ValueError(f"layers lists {len(taken)} checkpoint layers for a predictor of depth {depth}")
            absent = [i for i in taken if i not in ids]
            if absent:
                raise WeightLoadError(f"{ck.path}: checkpoint layers {absent} do not exist (it has ids {ids[0]}..{ids[-1]})"
                                      if ids else f"{ck.path}: the checkpoint has no layers")
        ck_is_global = _check_modernbert_config(ck, predictor, report)

        shapes = {n: tuple(t.shape) for n, t in predictor.named_parameters()}
        pieces = []
        for i, cid in enumerate(taken):
            for name in _MB_LAYER_KEYS:
                ours = f"layers.{i}.{name}"
                pieces.append(_Piece(f"{prefix}layers.{cid}.{name}", (shapes[ours],), [_all(ours)],
                                     optional=(name == "attn_norm.weight" and cid == 0)))
        _check_coverage(predictor, pieces, {n for n, _ in predictor.layers.named_parameters(prefix="layers")})
        planned = {p.key for p in pieces}
        taken_set = set(taken)
        unexpected = []
        for k in keys:
            if k in planned:
                continue
            m = layer_rx.match(k) if k.startswith(prefix) else None
            if m is None:
                report.ignored.append(k)
            elif int(m.group(1)) in taken_set:
                unexpected.append(k)
            else:
                report.truncated.append(k)
        if unexpected and strict:
            raise WeightLoadError(f"{ck.path}: {len(unexpected)} keys of the taken layers map to nothing in the "
                                  f"predictor (biases? a different architecture?): {_format_keys(unexpected)}; pass "
                                  f"strict=False to load anyway")
        present, report.missing = _verify(ck, pieces, "predictor")
        report.unexpected = unexpected
        report.layer_map = dict(enumerate(taken))
        report.kept = [f"in_proj.{n}" for n, _ in predictor.in_proj.named_parameters()]
        report.loaded, report.source_dtypes = _write(ck, present, predictor)

    ours = predictor.layer_ids
    pattern = [("global" if ck_is_global(c) else "local") for c in taken]
    mine = [("global" if layer.is_global else "local") for layer in predictor.layers]
    differs = f"attention pattern differs: checkpoint {pattern}, predictor {mine}"
    if taken != ours:
        extra = f"; {differs}" if pattern != mine else ""
        _note(report, f"weights: checkpoint layers {taken} loaded into predictor layers with ids {ours} "
                      f"(model.predictor.first_layer_id = {ours[0] if ours else '-'}){extra}")
    elif pattern != mine:  # same ids, another global/local rule (model.predictor.global_every, layer_types)
        _note(report, f"weights: checkpoint layers {taken}: {differs} (model.predictor.global_every)")
    if report.missing:
        _note(report, f"weights: {_format_keys(report.missing)} absent (ModernBERT's layer 0 has no attn_norm, "
                      f"an Identity); the predictor keeps its LayerNorm there, so that layer differs from ModernBERT's")
    if unexpected:
        _note(report, f"weights: {len(unexpected)} unexpected keys left unused: {_format_keys(unexpected)}")
    return report
