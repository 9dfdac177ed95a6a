"""Reading ivfast checkpoints without DeepSpeed: the directory layout, resume selection, a
weights-only loader, and the model's fp32 state dict from any ZeRO stage or a safetensors file.

Layout under ``<output_dir>/checkpoints/``:

- ``step_XXXXXXXX/`` (:data:`TAG_RE`): DeepSpeed's files plus :data:`STATE_FILE` (the loop's
  position), written last, after every rank's files. A tag without it is incomplete and is
  never resumed or read.
- :data:`LATEST`: the tag of the newest complete checkpoint, replaced atomically after its
  state file exists, so it never names an incomplete one.

This module must not import DeepSpeed or the trainer (export and probes read checkpoints on
machines and in processes that have neither).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from enum import IntEnum

import torch

log = logging.getLogger("ivfast.checkpoint_io")

STATE_FILE = "ivfast_state.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8,})$")

MODEL_FILE = "mp_rank_00_model_states.pt"
_ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_OTHER_MP_RE = re.compile(r"mp_rank_(?!00)\d+")


# ----------------------------------------------------------------------------- layout


def tag_for(step: int) -> str:
    """The tag of the checkpoint at ``step`` (``step_00000100``); :data:`TAG_RE` group 1 is the step."""
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoint tags (those with :data:`STATE_FILE`), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir)
            if TAG_RE.match(t) and os.path.isfile(os.path.join(ckpt_dir, t, STATE_FILE))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def find_resume(ckpt_dir: str) -> str | None:
    """The tag to resume from: :data:`LATEST` if it names a complete checkpoint, else the newest
    complete one, else None."""
    latest = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if tag and os.path.isfile(os.path.join(ckpt_dir, tag, STATE_FILE)):
            return tag
        log.warning("checkpoint 'latest' names %r, which is incomplete; looking for another", tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_state(ckpt_dir: str, tag: str) -> dict:
    """The loop state (:data:`STATE_FILE`) of checkpoint ``tag``."""
    with open(os.path.join(ckpt_dir, tag, STATE_FILE)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- weights-only loading
#
# DeepSpeed's optimiser files pickle three of its own classes beside the tensors. Weights-only
# unpickling resolves a global only by its qualified name in an allow-list, and that list may
# map a name to any class (``(cls, "qualified.name")``), so inert stand-ins here read the files
# without importing DeepSpeed. Readers need only the tensors; a loader that hands the objects
# back to DeepSpeed passes the real classes as ``extra_globals`` (they replace the stand-ins).


class _FragmentAddress:
    """Stands in for ``deepspeed.utils.tensor_fragment.fragment_address`` (fields ``numel``, ``start``)."""


class _LossScaler:
    """Stands in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` (fields ``cur_scale``, ``dynamic``)."""


class _ZeroStage(IntEnum):
    """Stands in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (same values)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


_STAND_INS = {
    "deepspeed.utils.tensor_fragment.fragment_address": _FragmentAddress,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _LossScaler,
    "deepspeed.runtime.zero.config.ZeroStageEnum": _ZeroStage,
}
DEEPSPEED_CLASSES = tuple(_STAND_INS)
"""Qualified names of the DeepSpeed classes that DeepSpeed's checkpoint files hold."""


def safe_load(path: str, map_location=None, extra_globals=()):
    """``torch.load(path, weights_only=True)`` that also accepts the classes named in
    :data:`DEEPSPEED_CLASSES`: as inert stand-ins, or as the classes in ``extra_globals``
    (each allowed under its own qualified name, replacing the stand-in of that name).

    No code from the file runs: any other global than tensors, plain containers and these
    classes is refused (``pickle.UnpicklingError``, "Weights only load failed").
    """
    allowed = dict(_STAND_INS)
    allowed.update((f"{c.__module__}.{c.__qualname__}", c) for c in extra_globals)
    with torch.serialization.safe_globals([(c, name) for name, c in allowed.items()]):
        return torch.load(path, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------- errors


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or laid out in a way this reader does not know."""


# ----------------------------------------------------------------------------- locating


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``("safetensors", file)`` or ``("deepspeed", tag_dir)`` for any accepted ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors", path
        raise CheckpointError(f"{path}: a checkpoint file must be .safetensors; for DeepSpeed checkpoints "
                              "pass the directory (run dir, checkpoints dir or step_XXXXXXXX dir)")
    if os.path.isdir(os.path.join(path, "checkpoints")) and not _is_tag_dir(path):
        path = os.path.join(path, "checkpoints")  # a run directory
    if _is_tag_dir(path):
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise CheckpointError(f"{path} is an incomplete checkpoint (no {STATE_FILE}: its save did not "
                                  f"finish); use another step or the checkpoints directory")
        return "deepspeed", path
    tags = [t for t in os.listdir(path) if TAG_RE.match(t)]
    if not tags and not os.path.isfile(os.path.join(path, LATEST)):
        raise CheckpointError(f"{path} holds no checkpoint (expected a run dir, a checkpoints dir with "
                              f"'{LATEST}' and step_XXXXXXXX dirs, a step dir, or a .safetensors file)")
    tag = find_resume(path)
    if tag is None:
        raise CheckpointError(f"{path} holds no complete checkpoint ({len(tags)} step dir(s), none with "
                              f"{STATE_FILE})")
    return "deepspeed", os.path.join(path, tag)


def tensor_shape(path: str, key: str) -> tuple[int, ...] | None:
    """The shape of tensor ``key`` in the checkpoint at ``path`` (any form :func:`resolve_checkpoint`
    accepts), read without loading the weights where the format allows: a safetensors header, a
    ZeRO-3 rank-0 model file's ``param_shapes``, else the ZeRO 0-2 module file. None: no such key."""
    kind, where = resolve_checkpoint(path)
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(where, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape()) if key in f.keys() else None
    rank0 = os.path.join(where, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    if not os.path.isfile(os.path.join(where, MODEL_FILE)) and os.path.isfile(rank0):  # ZeRO-3
        groups = safe_load(rank0, map_location="cpu").get("param_shapes", [])
        shapes = {k: v for group in groups for k, v in group.items()}
        return tuple(shapes[key]) if key in shapes else None
    module = safe_load(os.path.join(where, MODEL_FILE), map_location="cpu").get("module", {})
    return tuple(module[key].shape) if key in module else None


def _is_tag_dir(path: str) -> bool:
    if TAG_RE.match(os.path.basename(os.path.normpath(path))):
        return True
    return any(n.endswith("_model_states.pt") for n in os.listdir(path))


def find_run_dir(path: str) -> str | None:
    """The run directory (holding ``config.yaml``) of a checkpoint path, or None."""
    p = os.path.abspath(path)
    candidates = [p] if os.path.isdir(p) else [os.path.dirname(p)]
    for _ in range(2):
        candidates.append(os.path.dirname(candidates[-1]))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "config.yaml")):
            return c
    return None


# ----------------------------------------------------------------------------- loading


def load_model_state(path: str, *, master_weights: bool | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict in fp32 (integer buffers keep their dtype) from ``path``:

    - a ``.safetensors`` file (e.g. ``ivfast-export --full``);
    - a run directory (holding ``checkpoints/``), a checkpoints directory (the tag
      :func:`find_resume` picks) or one complete tag directory: :func:`load_deepspeed_tag`.

    ``master_weights`` (ZeRO 0-2 only): None picks the optimiser's fp32 master copy when the
    saved module is not fp32; True always rebuilds the trainable parameters from it; False
    reads ``module`` only.
    """
    kind, where = resolve_checkpoint(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(where, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from None
        return OrderedDict((k, _fp32(v)) for k, v in state.items())
    return load_deepspeed_tag(where, master_weights=master_weights)


def load_deepspeed_tag(tag_dir: str, *, master_weights: bool | None = None) -> dict[str, torch.Tensor]:
    """fp32 state dict of one DeepSpeed tag directory (ZeRO 0-3, one model-parallel rank).

    Every file is read with :func:`safe_load`. Layouts:

    - ZeRO 0-2: ``mp_rank_00_model_states.pt`` holds the whole module state (``module``). When
      the fp32 master weights are used (see :func:`load_model_state`), the trainable
      parameters are rebuilt from the optimiser partitions
      (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, key
      ``single_partition_of_fp32_groups``): each group's partitions concatenated in rank
      order, then cut into the parameters of ``param_shapes`` in order, skipping
      ``param_alignment_paddings``; frozen parameters and buffers come from ``module``.
    - ZeRO-3: per rank, ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` (``param_shapes``,
      buffers, ``frozen_param_shapes`` / ``frozen_param_fragments``) and the optimiser file
      (``fp32_flat_groups``). Each rank holds ``ceil(numel / world)`` elements of every
      trainable parameter, one after the other in ``param_shapes`` order (groups
      concatenated): parameter ``p`` is the concatenation over ranks of each rank's slice,
      cut to ``numel``. Frozen parameters are partitioned the same way, one fragment per
      rank in the model-state files.

    Any inconsistency (missing rank files, a world size that does not match, element counts
    that do not add up, files of two layouts) raises :class:`CheckpointError`.
    """
    names = os.listdir(tag_dir)
    others = [n for n in names if n.endswith(".pt") and _OTHER_MP_RE.search(n)]
    if others:
        raise CheckpointError(f"{tag_dir}: model-parallel checkpoints (e.g. {others[0]}) are not supported")
    zero3_models = _by_rank(names, _ZERO3_MODEL_RE)
    optims = _by_rank(names, _OPTIM_RE)
    has_single = MODEL_FILE in names
    if has_single and zero3_models:
        raise CheckpointError(f"{tag_dir}: holds both {MODEL_FILE} (ZeRO 0-2) and ZeRO-3 model files: "
                              "mixed layouts; point at a directory written by one run")
    if has_single:
        return _load_zero012(tag_dir, optims, master_weights)
    if zero3_models:
        return _load_zero3(tag_dir, zero3_models, optims)
    raise CheckpointError(f"{tag_dir}: no model states file ({MODEL_FILE} or "
                          "zero_pp_rank_*_mp_rank_00_model_states.pt)")


def _by_rank(names, pattern) -> dict[int, str]:
    out = {}
    for n in names:
        m = pattern.match(n)
        if m:
            out[int(m.group(1))] = n
    return dict(sorted(out.items()))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _load(tag_dir: str, name: str) -> dict:
    path = os.path.join(tag_dir, name)
    try:
        data = safe_load(path, map_location="cpu")
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = (f"it holds {found.group(1)}, which weights-only loading does not allow" if found
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise CheckpointError(f"{path}: cannot be read safely ({why})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint file (top level is {type(data).__name__})")
    return data


def _check_ranks(tag_dir: str, files: dict[int, str], world: int, what: str) -> list[str]:
    if sorted(files) != list(range(world)):
        raise CheckpointError(f"{tag_dir}: expected {what} files for ranks 0..{world - 1} (world size {world}), "
                              f"found ranks {sorted(files)}: an incomplete or overwritten checkpoint")
    return [files[r] for r in range(world)]


def _world(optim_sd: dict) -> int:
    count = optim_sd["partition_count"]
    return max(count) if isinstance(count, (list, tuple)) else int(count)


def _zero_stage(optim_sd: dict) -> int:
    return int(optim_sd.get("zero_stage", 0))


def _load_zero012(tag_dir: str, optims: dict[int, str], master_weights: bool | None) -> dict:
    model = _load(tag_dir, MODEL_FILE)
    if "module" not in model:
        raise CheckpointError(f"{os.path.join(tag_dir, MODEL_FILE)}: no 'module' entry")
    module = model["module"]
    all_fp32 = all(v.dtype == torch.float32 for v in module.values() if v.is_floating_point())
    use_master = (not all_fp32) if master_weights is None else master_weights
    state = OrderedDict((k, _fp32(v)) for k, v in module.items())
    if not use_master:
        return state
    if not optims:
        if master_weights:
            raise CheckpointError(f"{tag_dir}: no optimiser partitions to read fp32 master weights from")
        log.warning("%s: module is %s and there are no fp32 master weights; returning it cast to fp32",
                    tag_dir, next(iter(module.values())).dtype)
        return state
    first = _load(tag_dir, optims[min(optims)])["optimizer_state_dict"]
    if _zero_stage(first) == 3:
        raise CheckpointError(f"{tag_dir}: {MODEL_FILE} is a ZeRO 0-2 file but the optimiser files are ZeRO-3")
    if "single_partition_of_fp32_groups" not in first:
        raise CheckpointError(f"{tag_dir}: optimiser files hold no fp32 partitions "
                              "('single_partition_of_fp32_groups')")
    world = _world(first)
    files = _check_ranks(tag_dir, optims, world, "optimizer-state")
    parts = [first["single_partition_of_fp32_groups"]]
    for f in files[1:]:
        parts.append(_load(tag_dir, f)["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    shapes = model.get("param_shapes")
    if not shapes or len(shapes) != len(parts[0]):
        raise CheckpointError(f"{tag_dir}: {len(shapes or [])} parameter groups in the model file, "
                              f"{len(parts[0])} in the optimiser files")
    paddings = first.get("param_alignment_paddings")
    align = 2 * world
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([p[g] for p in parts])
        offset = 0
        for j, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            if offset + numel > flat.numel():
                raise CheckpointError(f"{tag_dir}: parameter group {g} has {flat.numel()} elements, too few for "
                                      f"its parameters (at {name})")
            if name not in state:
                raise CheckpointError(f"{tag_dir}: optimiser parameter {name} is not in the module state")
            state[name] = flat[offset: offset + numel].view(shape).clone()
            offset += numel + (paddings[g][j] if paddings else 0)
        if -(-offset // align) != -(-flat.numel() // align):
            raise CheckpointError(f"{tag_dir}: parameter group {g}: parameters use {offset} of {flat.numel()} "
                                  "elements: the optimiser files do not match the model file")
    for alias, target in model.get("shared_params", {}).items():
        if target in state:
            state[alias] = state[target]
    return state


def _load_zero3(tag_dir: str, model_files: dict[int, str], optims: dict[int, str]) -> dict:
    if not optims:
        raise CheckpointError(f"{tag_dir}: ZeRO-3 model files without optimiser files: the fp32 weights are "
                              "in zero_pp_rank_*_mp_rank_00_optim_states.pt")
    first = _load(tag_dir, optims[min(optims)])["optimizer_state_dict"]
    if _zero_stage(first) != 3 or "fp32_flat_groups" not in first:
        raise CheckpointError(f"{tag_dir}: ZeRO-3 model files but the optimiser files are ZeRO "
                              f"{_zero_stage(first)}: mixed layouts")
    world = _world(first)
    optim_files = _check_ranks(tag_dir, optims, world, "optimizer-state")
    model_names = _check_ranks(tag_dir, model_files, world, "model-state")
    models = [_load(tag_dir, f) for f in model_names]
    flats = [torch.cat([g.reshape(-1) for g in first["fp32_flat_groups"]])]
    for f in optim_files[1:]:
        flats.append(torch.cat([g.reshape(-1) for g in _load(tag_dir, f)["optimizer_state_dict"]["fp32_flat_groups"]]))
    if len({f.numel() for f in flats}) != 1:
        raise CheckpointError(f"{tag_dir}: ranks hold different numbers of fp32 elements "
                              f"{[f.numel() for f in flats]}")

    m0 = models[0]
    buffer_names = set(m0.get("buffer_names", []))
    state = OrderedDict()
    for k, v in m0["module"].items():
        if k in buffer_names:
            state[k] = _fp32(v)

    def gather(pieces, numel, shape):
        return torch.cat(pieces)[:numel].view(shape).clone()

    frozen = m0.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        numel = math.prod(shape)
        pieces = []
        for r, m in enumerate(models):
            frag = (m.get("frozen_param_fragments") or {}).get(name)
            if frag is None:
                raise CheckpointError(f"{tag_dir}: rank {r} has no fragment of frozen parameter {name}")
            pieces.append(frag.reshape(-1))
        state[name] = _fp32(gather(pieces, numel, shape))

    shapes = OrderedDict((k, v) for group in m0["param_shapes"] for k, v in group.items())
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = -(-numel // world)
        if offset + part > flats[0].numel():
            raise CheckpointError(f"{tag_dir}: the fp32 partitions are too short for the parameters (at {name})")
        state[name] = gather([f[offset: offset + part] for f in flats], numel, shape)
        offset += part
    if offset != flats[0].numel():
        raise CheckpointError(f"{tag_dir}: parameters use {offset} of {flats[0].numel()} fp32 elements per rank: "
                              "the optimiser files do not match the model files")
    for alias, target in m0.get("shared_params", {}).items():
        if target in state:
            state[alias] = state[target]
    missing = [k for k in m0["module"] if k not in state]
    if missing:
        raise CheckpointError(f"{tag_dir}: could not rebuild {len(missing)} tensor(s) of the module, "
                              f"e.g. {missing[:3]}")
    # The module's own key order (that of model.state_dict()).
    return OrderedDict((k, state[k]) for k in [*m0["module"], *[k for k in state if k not in m0["module"]]])
