"""Initialisation schemes applied to a built model from outside its modules (``model.init``).

Every module initialises itself when it is built; that is the ``"xavier"`` scheme, ivfast's own:
encoder Linears trunc-normal(0.02) with zero biases, the alignment / pooling / predictor-input
heads xavier-uniform, the predictor layers normal(0.02), the linear reconstruction head
PyTorch's default. :func:`apply_init` with ``"release"`` then changes, in place, exactly the
tensors whose law differs in the authors' release, so that a freshly built model starts as the
release's does:

- ``encoder.blocks.{i}.attn.proj.weight`` and ``encoder.blocks.{i}.mlp.fc2.weight``: divided by
  ``sqrt(2 * (i + 1))`` after their trunc-normal(0.02) draw (the release's ``fix_init_weight``,
  BEiT's: the residual branches of deeper blocks start smaller, so the residual stream's
  variance does not grow with depth).
- ``encoder.patch_embed.proj.{weight,bias}``: PyTorch's default init of a Linear / Conv3d of the
  same fan-in (weight kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias U(+-1/sqrt(fan_in))):
  the release's patch projection is an ``nn.Conv3d``, which its ``_init_weights`` (Linear and
  LayerNorm only) never reaches.
- The heads the release builds before its model-wide ``apply(_init_weights)``, which overwrites
  their own xavier init (``MLP_Decoder``): every Linear weight trunc-normal(std 0.02), biases
  zero. ivfast's ``align_heads.*`` (its clip decoders), ``pool`` (clip projector),
  ``final_head`` (final clip decoder), ``predictor.in_proj`` (``to_bert_proj``, both stages) and
  Stage 2's ``head`` (``selfdist_decoder``). The bounds of ``trunc_normal_`` are absolute,
  [-2, 2], in torch and in timm alike: at std 0.02 nothing is truncated (a plain normal).
- ``predictor.layers.*``: HF ModernBERT's own init (the release's predictor is a
  ``ModernBertForMaskedLM`` built after that ``apply``): ``attn.Wqkv`` and ``mlp.Wi``
  trunc-normal(std 0.02), ``attn.Wo`` and ``mlp.Wo`` trunc-normal(std 0.02 / sqrt(2 L)), L the
  source model's layer count (``first_layer_id + depth``: 28 for ModernBERT-large), truncated at
  +-2 std (its ``initializer_cutoff_factor``). The release loads ModernBERT-large's weights over
  them (as ``model.predictor.init_weights`` does here), so this matters only without them.
- ``recon_head.{weight,bias}`` (``recon=linear``): xavier-uniform, zero bias, the init of the
  release's ``mse_projector`` (an ``MLP_Decoder`` built after that ``apply``, so its own init
  stands); ivfast's head is one Linear where the release has that MLP.

Unchanged because both schemes agree already: the encoder's other Linears, all norms (one /
zero), LayerScale, the CLS and mask tokens (trunc-normal(0.02)), the position tables
(sine-cosine, CLS rows zero), and the diffusion head (``diffloss.*``: MAR's own init in both,
built after the release's ``apply``). In Stage 2 the Stage-1 weights then replace the encoder,
predictor and mask token; ``head`` keeps its init; the teacher is copied from the encoder again.

Call it once, right after the model is built and before any weights are loaded into it
(ModernBERT predictor weights, the Stage-1 weights of Stage 2, ``model.init_from``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ivfast.models.encoder import VideoEncoder
from ivfast.models.heads import AttentionPool, MLPHead
from ivfast.models.predictor import Predictor
from ivfast.models.stage1 import Stage1Model
from ivfast.models.stage2 import Stage2Model

SCHEMES = ("release", "xavier")
HEAD_STD = 0.02  # the release's trunc_normal_(std=.02) for every Linear its _init_weights reaches
MODERNBERT_STD = 0.02  # ModernBERT-large's initializer_range
MODERNBERT_CUTOFF = 2.0  # ModernBERT-large's initializer_cutoff_factor: bounds +-2 std


def block_output_divisor(i: int) -> float:
    """What the release's ``fix_init_weight`` divides block ``i`` (from 0)'s attention and MLP
    output projection weights by: ``sqrt(2 * (i + 1))``."""
    return math.sqrt(2.0 * (i + 1))


def apply_init(model: nn.Module, scheme: str) -> list[str]:
    """Apply ``scheme`` ("release" or "xavier") to a freshly built :class:`Stage1Model`,
    :class:`Stage2Model` or :class:`VideoEncoder`, in place; returns the names of the parameters
    it re-initialised or rescaled (none for "xavier": the modules' own init is that scheme, bit
    for bit). Draws from torch's global generator, in parameter order.

    Parameter names, shapes, dtypes and devices do not change. Raises ValueError for an unknown
    scheme, TypeError for another model, RuntimeError when a scheme was already applied.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"init scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(model, (Stage1Model, Stage2Model, VideoEncoder)):
        raise TypeError(f"apply_init takes a Stage1Model, Stage2Model or VideoEncoder, got {type(model).__name__}")
    if getattr(model, "init_scheme", None) is not None:
        raise RuntimeError(f"init scheme {model.init_scheme!r} was already applied to this model: "
                           "apply_init once, to a freshly built model")
    changed: list[str] = []
    if scheme == "release":
        with torch.no_grad():
            changed = _release(model)
    model.init_scheme = scheme
    return changed


def _release(model: nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    touched: list[nn.Parameter] = []
    if isinstance(model, VideoEncoder):
        touched += release_encoder_(model)
        return [names[id(p)] for p in touched]
    touched += release_encoder_(model.encoder)
    if isinstance(model, Stage1Model):
        for head in (*model.align_heads, model.pool, model.final_head):
            touched += trunc_normal_head_(head)
    if hasattr(model, "predictor"):  # Stage 1 without reconstruction has none
        touched += trunc_normal_head_(model.predictor.in_proj)
        touched += modernbert_layers_(model.predictor)
    if isinstance(model, Stage1Model) and model.recon == "linear":
        nn.init.xavier_uniform_(model.recon_head.weight)
        nn.init.zeros_(model.recon_head.bias)
        touched += [model.recon_head.weight, model.recon_head.bias]
    if isinstance(model, Stage2Model):
        touched += trunc_normal_head_(model.head)
        model.copy_encoder_to_teacher()
    return [names[id(p)] for p in touched]


def release_encoder_(encoder: VideoEncoder) -> list[nn.Parameter]:
    """The patch projection at PyTorch's default Linear/Conv init; each block's ``attn.proj`` and
    ``mlp.fc2`` weights divided by :func:`block_output_divisor`."""
    proj = encoder.patch_embed.proj
    nn.Linear.reset_parameters(proj)  # the law of an nn.Conv3d of the same fan-in
    touched = [proj.weight, proj.bias]
    for i, block in enumerate(encoder.blocks):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            weight.div_(block_output_divisor(i))
            touched.append(weight)
    return touched


def trunc_normal_head_(head: nn.Module, std: float = HEAD_STD) -> list[nn.Parameter]:
    """Every Linear weight of an :class:`MLPHead` or :class:`AttentionPool` trunc-normal(``std``)
    with torch's default absolute bounds [-2, 2] (timm's ``trunc_normal_`` too); biases zero;
    norms and the pool's separate q/k/v biases keep their init (one / zero)."""
    if not isinstance(head, (MLPHead, AttentionPool)):
        raise TypeError(f"expected an MLPHead or AttentionPool, got {type(head).__name__}")
    touched = []
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            touched.append(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
                touched.append(m.bias)
    return touched


def modernbert_layers_(predictor: Predictor, std: float = MODERNBERT_STD,
                       cutoff: float = MODERNBERT_CUTOFF) -> list[nn.Parameter]:
    """HF ModernBERT's init of the predictor's layers: input projections (``Wqkv``, ``mlp.Wi``)
    trunc-normal(``std``), output projections (``attn.Wo``, ``mlp.Wo``) trunc-normal(``std`` /
    sqrt(2 L)), L = the source model's layer count, both truncated at +-``cutoff`` std; norms one."""
    if not len(predictor.layers):
        return []
    num_layers = predictor.layers[-1].layer_id + 1
    out_std = std / math.sqrt(2.0 * num_layers)
    touched = []
    for layer in predictor.layers:
        for lin, s in ((layer.attn.Wqkv, std), (layer.attn.Wo, out_std), (layer.mlp.Wi, std), (layer.mlp.Wo, out_std)):
            nn.init.trunc_normal_(lin.weight, std=s, a=-cutoff * s, b=cutoff * s)
            touched.append(lin.weight)
    return touched
