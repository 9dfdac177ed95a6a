"""A Stage-1 checkpoint of the authors' release mapped into ivfast's whole :class:`Stage1Model`.

``map_stage1(state)`` takes the release model's state dict (already unwrapped: no ``module.``
prefix, e.g. ``ckpt["model"]`` or DeepSpeed's ``["module"]``) and returns ivfast's Stage1Model
state dict (every key filled, in the model's order) and the release keys it consumed.
``infer_stage1_config(state)`` reads the :class:`Stage1Config` off the tensors' shapes.

The encoder (``patch_embed.*``, ``cls_token``, ``pos_embed``, ``blocks.*``) goes through
:func:`ivfast.models.release.map_encoder`; the rest, release key -> ivfast key:

==============================================================  ==========================================
release                                                         ivfast
==============================================================  ==========================================
``clip_decoder.{i}.{head.0, head.2, norm}.{weight, bias}``      ``align_heads.{i}.{fc1, fc2, norm}``
``clip_pos_embed`` (1, C + N, D)                                ``align_pos.table``: rows C.. (N, D) [1]_
``clip_projector.{norm1_q, norm1_k, norm1_v}``                  ``pool.{norm_q, norm_k, norm_v}``
``clip_projector.cross_attn.{q, k, v}.weight``                  ``pool.{q, k, v}.weight``
``clip_projector.cross_attn.{q, k, v}_bias``                    ``pool.{q, k, v}_bias``
``clip_projector.cross_attn.proj``                              ``pool.proj``
``final_clip_decoder.{head.0, head.2, norm}``                   ``final_head.{fc1, fc2, norm}``
``bert_mask_token`` (1, 1, D)                                   ``mask_token`` (D,)
``diff_pos_embed`` (1, C + N, D)                                ``predictor_pos.table`` (C + N, D)
``to_bert_proj.{head.0, head.2, norm}``                         ``predictor.in_proj.{fc1, fc2, norm}``
``bert_decoder.layers.{i}.<name>``                              ``predictor.layers.{i}.<name>`` [2]_
``diffloss.net.res_blocks.{i}.in_ln``                           ``diffloss.net.res_blocks.{i}.norm``
``diffloss.net.<any other name>``                               ``diffloss.net.<same name>`` [3]_
==============================================================  ==========================================

C is the number of CLS tokens (``cls_token``'s rows), N = t*h*w patch tokens.

.. [1] The release adds ``clip_pos_embed``'s C CLS rows only to the CLS outputs, which its
   alignment heads then drop; ivfast's table has no CLS rows, so those rows are not taken.
.. [2] ``<name>`` in ``attn_norm.weight``, ``attn.Wqkv.weight``, ``attn.Wo.weight``,
   ``mlp_norm.weight``, ``mlp.Wi.weight``, ``mlp.Wo.weight`` (HF ModernBERT's names, which the
   predictor keeps). The release keeps ``layers[-5:]`` of ModernBERT-large, renumbered 0..4.
.. [3] ``time_embed.mlp.{0,2}``, ``cond_embed``, ``input_proj``, ``res_blocks.{i}.mlp.{0,2}``,
   ``res_blocks.{i}.adaLN_modulation.1``, ``final_layer.adaLN_modulation.1``,
   ``final_layer.linear`` (MAR's SimpleMLPAdaLN; ``final_layer.norm_final`` has no parameters).

Release keys deliberately not taken (:data:`NOT_TAKEN`): ModernBERT's ``embeddings.*`` and
``final_norm.*`` (the release feeds the layers the projected video tokens directly and takes
the last layer's output un-normed) and any stored rotary-frequency buffers (recomputed).
Nothing else is skipped: the release stores neither the frozen teacher (a separate model in
its trainer) nor diffusion schedules (plain arrays, not module buffers) in this state dict.

Not representable (:class:`~ivfast.models.release.ReleaseCheckpointError`, a ``ValueError``):
the release's MSE head (``mse_projector.*``, built when its ``diffloss=False``) is an MLP
(Linear, GELU, Linear, LayerNorm) where ivfast's linear recon head is one Linear (the release's
forward cannot train that variant either: it always calls the diffusion loss); separable
position tables (``sep_pos_embed``: no ``diff_pos_embed``); a ``final_clip_decoder`` missing
(``clip_teacher_final_dim`` 0) or of another width than the per-layer heads (ivfast has one
``teacher_width``).

What the weights do not say (:func:`infer_stage1_config` then uses the release's values):

- which encoder blocks the alignment heads read: the release's scripts return the last K
  blocks (``clip_student_return_interval`` 1), as ivfast always does; head i reads the i-th
  of them, ascending, like the teacher's targets. (The published forward feeds every head
  ``x_clip[idx]``, idx being the last block's index: it runs only for K = depth, every head
  then reading the last block; the mapping follows the per-head pairing, not that slip.)
- the attention pool's heads: 16 (``attn_pool_num_heads`` in every release model);
- the teacher: only its width is in the weights (the alignment heads' output width); its
  depth, heads and return layers are the teacher's own config;
- the predictor's heads (16), local window (128), global-attention period (3), its first
  ModernBERT layer id (28 - depth = 23: ModernBERT-large has 28 layers), RoPE thetas and
  norm eps: ModernBERT-large's config, which the release hard-codes;
- the diffusion timesteps (1000) and schedule (cosine), ``batch_mul`` (1, the release
  models' ``diffusion_batch_mul``), and its precision (``fp32``: the release computes the
  loss under float32 autocast);
- the loss weights (1, 1, 1: the release's ``clip_loss_ratio``);
- for the encoder, what :func:`ivfast.models.release.infer_encoder_kwargs` documents (heads
  from the release's widths, 224 px frames, tanh GELU, LayerScale init 1e-5), except the
  drop-path rate: 0.1, the release's Stage-1 scripts' (a Stage1Config is for training).
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch

from ivfast.models.diffloss import DiffusionConfig
from ivfast.models.encoder import EncoderConfig
from ivfast.models.predictor import PredictorConfig
from ivfast.models.release import ReleaseCheckpointError, infer_encoder_kwargs, map_encoder
from ivfast.models.stage1 import AlignConfig, Stage1Config, Stage1Model

__all__ = ["NOT_TAKEN", "infer_stage1_config", "map_stage1", "not_taken"]

#: Release keys ivfast deliberately does not take: (regular expression, why).
NOT_TAKEN: tuple[tuple[str, str], ...] = (
    (r"bert_decoder\.embeddings\.", ("ModernBERT's token embeddings and their norm: the release feeds the layers "
                                     "the projected video tokens directly")),
    (r"bert_decoder\.final_norm\.", "ModernBERT's final norm: the release takes the last layer's output un-normed"),
    (r"bert_decoder\.(.*\.)?rotary_emb\.", "rotary frequency buffers: recomputed from the predictor's config"),
)

# the release's ModernBERT-large, hard-coded in its Stage-1 model
MODERNBERT_LARGE_LAYERS = 28
RELEASE_STAGE1_DROP_PATH = 0.1  # the release's Stage-1 scripts' --drop_path (not in the weights)
_BERT_LAYER_NAMES = ("attn_norm.weight", "attn.Wqkv.weight", "attn.Wo.weight", "mlp_norm.weight", "mlp.Wi.weight",
                     "mlp.Wo.weight")
_WB = ("weight", "bias")

Plan = list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.is_floating_point() else t.detach()


def not_taken(key: str) -> str | None:
    """Why the release key ``key`` is deliberately not taken, or None if it should be mapped."""
    for pattern, why in NOT_TAKEN:
        if re.match(pattern, key):
            return why
    return None


def _check_unwrapped(state: Mapping[str, torch.Tensor]) -> None:
    if not state:
        raise ReleaseCheckpointError("empty release state dict")
    wrapped = [k for k in state if k.startswith("module.")]
    if wrapped:
        raise ReleaseCheckpointError(
            f"the state dict is wrapped ({len(wrapped)} keys start with 'module.', e.g. {wrapped[0]!r}); pass the "
            "unwrapped model state (strip the 'module.' prefix first)")


def _need(state: Mapping[str, torch.Tensor], key: str, why: str) -> torch.Tensor:
    if key not in state:
        raise ReleaseCheckpointError(f"release Stage-1 state dict has no {key!r} ({why})")
    return state[key]


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in state for m in [rx.match(k)] if m}
    if ids and ids != set(range(len(ids))):
        raise ReleaseCheckpointError(f"release keys matching {pattern!r} have non-contiguous indices {sorted(ids)}")
    return len(ids)


def _check_representable(state: Mapping[str, torch.Tensor]) -> None:
    mse = sorted(k for k in state if k.startswith("mse_projector."))
    if mse:
        raise ReleaseCheckpointError(
            f"the release checkpoint has an MSE reconstruction head ({', '.join(mse[:3])}...): an MLP (Linear, GELU, "
            "Linear, LayerNorm) that ivfast's linear recon head (one Linear) cannot represent; only diffusion-"
            "reconstruction release checkpoints map into a Stage1Model")
    sep = sorted(k for k in state if re.match(r"(clip_)?pos_embed_(spatial|temporal|cls)$", k))
    if sep:
        raise ReleaseCheckpointError(
            f"separable position tables ({', '.join(sep)}) are not supported here: the release's Stage-1 forward "
            "needs the joint diff_pos_embed, which that variant does not build")


def infer_stage1_config(state: Mapping[str, torch.Tensor], *, heads: int | None = None,
                        num_frames: int | None = None, img_size: int | None = None) -> Stage1Config:
    """The :class:`Stage1Config` of a release Stage-1 state dict (unwrapped); what the weights
    cannot say takes the release's values (see the module docstring). ``heads``, ``num_frames``
    and ``img_size`` go to :func:`~ivfast.models.release.infer_encoder_kwargs` (needed for a
    width outside the release's, or a position table not made of 224 px frames)."""
    _check_unwrapped(state)
    _check_representable(state)
    kw = dict(infer_encoder_kwargs(state, prefix="", heads=heads, num_frames=num_frames, img_size=img_size))
    kw["drop_path"] = RELEASE_STAGE1_DROP_PATH
    enc_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    encoder = EncoderConfig(**{k: v for k, v in kw.items() if k in enc_fields})
    width = encoder.width

    n_heads = _count(state, r"clip_decoder\.(\d+)\.")
    if n_heads == 0:
        raise ReleaseCheckpointError("release Stage-1 state dict has no alignment heads (clip_decoder.{i}.*)")
    hidden = _need(state, "clip_decoder.0.head.0.weight", "the first alignment head").shape[0]
    teacher = _need(state, "clip_decoder.0.head.2.weight", "the first alignment head").shape[0]
    final = _need(state, "final_clip_decoder.head.2.weight",
                  "the final alignment head; clip_teacher_final_dim 0 has none, ivfast always has one").shape[0]
    if final != teacher:
        raise ReleaseCheckpointError(
            f"the release's per-layer heads align to width {teacher} and the final head to {final}; ivfast's "
            "Stage1Config has one teacher_width")
    pool_dim = _need(state, "clip_projector.cross_attn.proj.weight", "the attention pool").shape[0]
    align = AlignConfig(num_layers=n_heads, head_hidden=0 if hidden == width else int(hidden), pool_heads=16,
                        pool_dim=int(pool_dim))

    if not any(k.startswith("diffloss.") for k in state):
        raise ReleaseCheckpointError(
            "release Stage-1 state dict has no diffusion head (diffloss.net.*): nothing to map the reconstruction into")
    depth = _count(state, r"bert_decoder\.layers\.(\d+)\.")
    if depth == 0:
        raise ReleaseCheckpointError("release Stage-1 state dict has no predictor layers (bert_decoder.layers.{i}.*)")
    p_width = _need(state, "to_bert_proj.head.2.weight", "the predictor's input projection").shape[0]
    mlp_hidden = _need(state, "bert_decoder.layers.0.mlp.Wo.weight", "the first predictor layer").shape[1]
    predictor = PredictorConfig(width=int(p_width), depth=depth, heads=16, mlp_hidden=int(mlp_hidden), window=128,
                                global_every=3, first_layer_id=max(MODERNBERT_LARGE_LAYERS - depth, 0))

    d_width = _need(state, "diffloss.net.input_proj.weight", "the diffusion net's input").shape[0]
    d_depth = _count(state, r"diffloss\.net\.res_blocks\.(\d+)\.")
    target = _need(state, "diffloss.net.input_proj.weight", "the diffusion net's input").shape[1]
    out = _need(state, "diffloss.net.final_layer.linear.weight", "the diffusion net's output").shape[0]
    if out not in (target, 2 * target):
        raise ReleaseCheckpointError(
            f"diffusion net outputs {out} channels for {target}-channel targets (expected {target} or {2 * target})")
    diffusion = DiffusionConfig(width=int(d_width), depth=d_depth, num_timesteps=1000, schedule="cosine",
                                learn_sigma=out == 2 * target, batch_mul=1, precision="fp32")
    return Stage1Config(num_frames=int(kw["num_frames"]), img_size=int(kw["img_size"]), recon="diffusion",
                        loss_weights=[1.0, 1.0, 1.0], teacher_width=int(teacher), encoder=encoder, align=align,
                        predictor=predictor, diffusion=diffusion)


def _mlp_head(plan: Plan, src: str, dst: str) -> None:
    for s, d in (("head.0", "fc1"), ("head.2", "fc2"), ("norm", "norm")):
        for kind in _WB:
            plan.append((f"{src}.{s}.{kind}", f"{dst}.{d}.{kind}", _same))


def _plan(cfg: Stage1Config) -> Plan:
    """(release key, ivfast key, value function) for everything but the encoder."""
    ncls = cfg.encoder.num_cls_tokens
    plan: Plan = []
    for i in range(cfg.align.num_layers):
        _mlp_head(plan, f"clip_decoder.{i}", f"align_heads.{i}")
    plan.append(("clip_pos_embed", "align_pos.table", lambda t: t[0, ncls:]))
    for r, o in (("norm1_q", "norm_q"), ("norm1_k", "norm_k"), ("norm1_v", "norm_v"), ("cross_attn.proj", "proj")):
        for kind in _WB:
            plan.append((f"clip_projector.{r}.{kind}", f"pool.{o}.{kind}", _same))
    for x in "qkv":
        plan.append((f"clip_projector.cross_attn.{x}.weight", f"pool.{x}.weight", _same))
        plan.append((f"clip_projector.cross_attn.{x}_bias", f"pool.{x}_bias", _same))
    _mlp_head(plan, "final_clip_decoder", "final_head")
    if cfg.recon == "none":
        return plan
    plan.append(("bert_mask_token", "mask_token", lambda t: t.reshape(t.shape[-1])))
    plan.append(("diff_pos_embed", "predictor_pos.table", lambda t: t[0]))
    _mlp_head(plan, "to_bert_proj", "predictor.in_proj")
    for i in range(cfg.predictor.depth):
        for name in _BERT_LAYER_NAMES:
            plan.append((f"bert_decoder.layers.{i}.{name}", f"predictor.layers.{i}.{name}", _same))
    if cfg.recon != "diffusion":
        return plan
    net = "diffloss.net."
    names = [f"time_embed.mlp.{j}.{kind}" for j in (0, 2) for kind in _WB]
    names += [f"{m}.{kind}" for m in ("cond_embed", "input_proj") for kind in _WB]
    for i in range(cfg.diffusion.depth):
        blk = f"res_blocks.{i}."
        for kind in _WB:
            plan.append((f"{net}{blk}in_ln.{kind}", f"{net}{blk}norm.{kind}", _same))
        names += [f"{blk}{m}.{kind}" for m in ("mlp.0", "mlp.2", "adaLN_modulation.1") for kind in _WB]
    names += [f"final_layer.{m}.{kind}" for m in ("adaLN_modulation.1", "linear") for kind in _WB]
    plan += [(net + n, net + n, _same) for n in names]
    return plan


def _format(keys, limit: int = 10) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def map_stage1(state: Mapping[str, torch.Tensor], cfg: Stage1Config | None = None, *,
               encoder: tuple[dict[str, torch.Tensor], list[str]] | None = None
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ivfast's :class:`Stage1Model` state dict from a release Stage-1 state dict (unwrapped),
    and the release keys consumed (encoder keys first, then the rest in the table's order).

    Every release key is mapped or deliberately not taken (:data:`NOT_TAKEN`); any other key,
    an ivfast key left unfilled or a shape that does not fit raises
    :class:`~ivfast.models.release.ReleaseCheckpointError` (a ``ValueError``) naming them. The
    keys and shapes are those of ``Stage1Model(cfg)``, ``cfg`` by default
    :func:`infer_stage1_config`'s (pass one for a width or table size it cannot settle alone);
    the dict loads into that model with ``strict=True``. Floating tensors come back as float32
    (as :func:`~ivfast.models.release.map_encoder` returns the encoder's). ``encoder``: what
    ``map_encoder(state, prefix="")`` returns, when the caller has it already (a whole-model
    import maps the encoder once).
    """
    _check_unwrapped(state)
    _check_representable(state)
    if cfg is None:
        cfg = infer_stage1_config(state)
    if cfg.recon != "diffusion":
        raise ReleaseCheckpointError(f"cfg.recon is {cfg.recon!r}: a release Stage-1 checkpoint (predictor and "
                                     "diffusion head) maps into a Stage1Model with recon='diffusion' only")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Stage1Model(cfg).state_dict().items()}

    out: dict[str, torch.Tensor] = {}
    consumed: list[str] = []
    enc_sd, enc_keys = map_encoder(state, prefix="") if encoder is None else encoder
    for k, v in enc_sd.items():
        out[f"encoder.{k}"] = v
    consumed += list(enc_keys)

    missing_release, bad_rank = [], []
    for src, dst, fn in _plan(cfg):
        if src not in state:
            missing_release.append(f"{src} (for {dst})")
            continue
        consumed.append(src)
        try:
            out[dst] = _fp32(fn(state[src]))
        except (IndexError, RuntimeError):  # a tensor of the wrong rank for its transform
            bad_rank.append(f"{src}: {tuple(state[src].shape)} (for {dst})")

    taken = set(consumed)
    unexpected = sorted(k for k in state if k not in taken and not_taken(k) is None)
    unfilled = [k for k in expected if k not in out and not any(f"(for {k})" in b for b in bad_rank)]
    extra = sorted(k for k in out if k not in expected)
    bad_shape = bad_rank + [f"{k}: {tuple(out[k].shape)} vs {expected[k]}" for k in expected
                            if k in out and tuple(out[k].shape) != expected[k]]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected release keys (neither mapped nor deliberately not taken): "
                        f"{_format(unexpected)}")
    if unfilled:
        problems.append(f"{len(unfilled)} ivfast keys left unfilled: {_format(unfilled)}"
                        + (f"; release keys absent: {_format(missing_release)}" if missing_release else ""))
    if extra:  # the encoder mapping and the model disagree
        problems.append(f"{len(extra)} mapped keys the Stage1Model does not have: {_format(extra)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatches (mapped vs Stage1Model): {_format(bad_shape)}")
    if problems:
        raise ReleaseCheckpointError("cannot map the release Stage-1 state dict: " + " | ".join(problems))
    ordered = OrderedDict((k, out[k]) for k in expected)
    return ordered, consumed
