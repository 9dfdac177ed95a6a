"""Analytic GPU memory of one Stage-1 training step, per component, for two ways of running it.

Bytes are modelled, not measured: static memory from the exact parameter counts
(:mod:`ivfast.memory.params`) and the DeepSpeed ZeRO layout; activations (what autograd saves
for backward) from per-layer formulas that follow ``ivfast/models`` op by op; transients from
the largest working set of a phase. The formulas are checked on the CPU against the bytes
:mod:`ivfast.memory.saved_tensors` measures (tests/memory/test_memory_model.py).
:data:`ASSUMPTIONS` says how the step and the two ways are modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ivfast.config import RELEASE_WAY, Config, chunking_allowed, with_overrides
from ivfast.masks import num_reconstructed, num_visible_per_frame
from ivfast.memory.params import ParamCounts, count_params

ASSUMPTIONS = """Two ways:

- release's way: ivfast run with ``ivfast.config.RELEASE_WAY`` (no fused kernels, no lean saves, no
  chunked diffusion loss, no activation checkpointing, an fp32 teacher with eager attention,
  an fp32 diffusion head over every masked token, a 5e8 DeepSpeed gradient bucket), plus five
  things of the release's code that ivfast has no switch for: every patch is embedded before
  the mask drops 80% of them; the teacher's fp32 full-token layers live through the step (and
  the fp32 visible-token targets gathered from them); the predictor's attention keeps the whole
  Wqkv output; its diffusion head computes SiLU(y) in every block and its variational-bound
  term saves 22 (rows, C) tensors, not 17. Flash attention
  in the student (O(N) saved), the teacher under bf16 autocast with eager attention (its
  scores in bf16, their softmax in fp32), ZeRO-1.
- ivfast's way: the config as written: bf16 activations, flash-class attention, the fused
  kernels of ``model.fused_kernels``, the lean saves of ``model.lean_saves`` (the MLPs keep
  their input and fc1 output; each predictor LayerNorm and the Linear after it keep the norm's
  input and stats; the LayerScale inputs stay bf16; the alignment heads recompute LayerNorm +
  l2; the cosine loss keeps the bf16 target; the masked-token gather keeps its index; the VB
  term is recomputed in backward; its arithmetic, and so what it saves, is fp32 whatever the
  head's dtype), the teacher in ``model.teacher.precision`` gathered at the
  visible tokens before the student runs, activation checkpointing from ``model.checkpointing``,
  ``model.diffusion.reconstruction_ratio``, and with ``model.diffusion.chunk_rows`` > 0 (not
  under ZeRO-3) the diffusion loss and its backward a chunk of rows at a time in the forward
  (kept: the gradient w.r.t. z and float32 parameter gradients; one chunk is a transient).

The step:

- peak = static + max(teacher phase, forward end / backward start, optimiser step); forward
  end = activations + live teacher outputs + the largest transient of the forward; a
  transient is one layer's working set (MLP hidden, attention scores, the loss's
  temporaries), never two at once.
- static = bf16 weights + gradients + fp32 master weights + two fp32 Adam moments, split
  across ``world`` ranks as ZeRO does (stage 1: optimiser states; 2: + gradients; 3: +
  weights), + the ZeRO gradient bucket (``reduce_bucket_size`` elements of bf16 at stages 1-2
  with contiguous gradients) + the frozen teacher weights. The optimiser step adds an fp32
  copy of the gradient partition.
- the CUDA context and library workspaces are outside torch's allocator: the report adds
  ``CUDA_CONTEXT_GIB`` to compare with nvidia-smi. No fragmentation factor.
- the mask keeps ``L - int(L * ratio)`` tokens per frame.
"""

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS/cuDNN workspaces on an A100/H100, outside torch's allocator
VB_TENSORS = 17  # (M, C) tensors the learned-sigma variational-bound loss saves (op graph of vb_terms_bpd)
# The release's gaussian_diffusion saves 5 more: its _extract_into_tensor broadcasts every schedule
# coefficient to a full (M, C) tensor. Measured on the release's own code by
# benchmarks/release_head_memory.py (results in benchmarks/results/release_head_memory-cpu-*).
RELEASE_VB_TENSORS = 22


@dataclass
class Way:
    """How a step runs, as far as memory goes."""

    name: str
    act_bytes: int = 2  # student activations: 2 bf16, 4 fp32
    attention: str = "flash"  # "math": B*H*N*N probabilities saved; otherwise O(N) (flash, sdpa, flex)
    fused: bool = False
    diffusion_bytes: int = 2
    teacher_param_bytes: int = 2
    teacher_stream_bytes: int = 2  # the teacher's residual stream and returned layers
    teacher_eager: bool = False  # scores materialised in the teacher (no_grad transient)
    checkpointing: tuple = ()
    reconstruction_ratio: float = 1.0
    grad_bucket: bool = True
    bucket_elems: int | None = None  # ZeRO reduce bucket (elements); None: ``deepspeed.reduce_bucket_size``
    lean: bool = False  # lean saves (model.lean_saves)
    teacher_visible_only: bool = False  # the teacher layers live through the step at the visible tokens only
    embed_visible_only: bool = True  # only the visible patches are embedded (else every patch, then a gather)
    shared_silu: bool = True  # the diffusion head computes SiLU(y) once (else once per adaLN projection)
    predictor_v_copy: bool = False  # the predictor's attention keeps a copy of v, not the whole Wqkv output
    diffusion_chunk_rows: int = 0  # > 0: the head's loss + backward run in chunks in the forward (not under ZeRO-3)
    vb_tensors: int = VB_TENSORS  # (rows, C) tensors the variational-bound term saves
    vb_fp32: bool = True  # the VB arithmetic in fp32 whatever the head's dtype (ivfast); else the head's dtype


@dataclass
class Shapes:
    batch: int
    frames: int
    grid: int  # patches per frame
    visible: int  # visible tokens per sample
    masked: int  # masked tokens per sample
    cls: int
    teacher_tokens: int  # per frame


def shapes(cfg: Config) -> Shapes:
    e, d, t = cfg.model.encoder, cfg.data, cfg.model.teacher
    frames = d.num_frames // e.tubelet_size
    grid = (d.img_size // e.patch_size) ** 2
    vis = num_visible_per_frame(grid, cfg.model.mask_ratio)
    return Shapes(d.batch_size, frames, grid, frames * vis, frames * (grid - vis), e.num_cls_tokens,
                  (t.img_size // t.patch_size) ** 2)


@dataclass
class MemoryEstimate:
    """Bytes of one step on one rank; ``activations`` and ``static`` are per component."""

    way: str
    static: dict[str, float] = field(default_factory=dict)
    activations: dict[str, float] = field(default_factory=dict)
    teacher_outputs: float = 0.0
    transients: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    params: ParamCounts | None = None

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    def gib(self, with_context: bool = True) -> float:
        return self.peak / GIB + (CUDA_CONTEXT_GIB if with_context else 0.0)


# ----------------------------------------------------------------------------- static


def static_bytes(trainable: int, zero_stage: int, world: int, bucket_elems: int, bf16: bool = True) -> dict:
    """DeepSpeed's per-rank bytes for ``trainable`` parameters (AdamW): weights, gradients,
    fp32 master + moments, the gradient bucket, and the optimiser step's fp32 gradient copy."""
    w = max(1, world)
    lo = 2 if bf16 else 4
    part = lambda stage: w if zero_stage >= stage else 1  # noqa: E731
    out = {
        "weights": trainable * lo / part(3),
        "gradients": trainable * lo / part(2),
        "optimizer states": trainable * (12 if bf16 else 8) / part(1),
    }
    if zero_stage == 0 and bf16:  # BF16_Optimizer: fp32 gradient accumulators
        out["gradients"] += trainable * 4
    if zero_stage in (1, 2) and bucket_elems:
        out["gradient bucket"] = min(bucket_elems, trainable) * lo if zero_stage == 2 else bucket_elems * lo
    out["step: fp32 gradient partition"] = trainable * 4 / part(1) if bf16 else 0.0
    return out


# ----------------------------------------------------------------------------- activations per token


def rmsnorm(width: int, a: int, fused: bool) -> float:
    """RMSNorm on an input that needs grad: the fp32 input (or its fp32 copy), x*rstd, rstd.
    Fused kernel: the input and rstd."""
    return width * a + 4 if fused else 8 * width + 4


def encoder_block(d: int, heads: int, hidden: int, n: int, a: int, attention: str, fused: bool,
                  lean: bool = False) -> float:
    """Saved bytes per token of one release-style block (n tokens per sequence): two
    RMSNorms, the qkv input, QK-norm, attention, the two fp32 LayerScale inputs, the MLP
    (fc1 input, GELU input, fc2 input; ``lean``: fc1 input and output, LayerScale inputs in
    the activation dtype)."""
    if fused:  # the kernel keeps q, k (views: the whole qkv output) and rstd
        qk, qkv_kept = 3 * a * d + 8, True
    elif a == 4:  # fp32: x is q itself (a view: the whole qkv output), + x*rstd
        qk, qkv_kept = 12 * d + 8 * d + 8, True
    else:  # fp32 copies of q, k + x*rstd
        qk, qkv_kept = 16 * d + 8, False
    if attention == "math":  # contiguous fp32 q, k, v for the matmuls, the probabilities, proj input
        attn = 12 * d + 4 * heads * n + a * d
    else:  # q, k, v (v a view of qkv), out (= proj input), logsumexp
        attn = 2 * a * d + (0 if qkv_kept else 3 * a * d) + a * d + 4 * heads
    mlp = a * d + (1 if lean else 2) * a * hidden
    layer_scale = 2 * a * d if lean else 8 * d  # the two LayerScale inputs: as they are, or fp32 copies
    return 2 * rmsnorm(d, a, fused) + a * d + qk + attn + layer_scale + mlp


def encoder_embed(patch_dim: int, d: int, a: int, fused: bool) -> float:
    """Per patch token (all tokens, before the gather): RMSNorm on the pixels (no grad: x*rstd),
    the projection input, RMSNorm on its output."""
    if fused:
        return a * patch_dim + 4 + a * patch_dim + rmsnorm(d, a, True)
    return 4 * patch_dim + a * patch_dim + rmsnorm(d, a, False)


def align_head(d: int, tw: int, a: int, lean: bool = False, target_bytes: int | None = None) -> float:
    """Per visible token of one head: 3 MLP inputs (``lean``: fc1 input and output),
    LayerNorm input + stats, its output (l2 normalise; ``lean``: recomputed, only the
    LayerNorm input kept), the fp32 copy of the target the cosine
    loss keeps (none in fp32: it keeps the gathered teacher layer itself, a live teacher
    output; ``lean``: the target as it is, a copy only if the teacher's dtype
    (``target_bytes``) differs)."""
    if lean:
        target = a * tw if target_bytes not in (None, a) else 0
        return 2 * a * d + a * tw + target
    target = 4 * tw if a < 4 else 0
    return 3 * a * d + a * tw + 8 + a * tw + target + 3 * a


def pool(d: int, heads: int, a: int, attention: str) -> float:
    """Per encoder token: the LayerNorm input and stats, k/v Linear inputs, attention's k, v."""
    kv = 8 * d + 4 * heads if attention == "math" else 2 * a * d
    return a * d + 16 + 2 * a * d + kv


def predictor_layer(w: int, heads: int, hidden: int, n: int, window: int | None, a: int, attention: str,
                    lean: bool = False, v_copy: bool = False) -> float:
    """Per token of one ModernBERT layer (window: keys seen per query, None = global): each of
    the two LayerNorms keeps its input and stats and hands its output to a Linear that keeps it
    (Wqkv, Wi); the GeGLU MLP keeps Wi's output (2 x hidden), GELU(input) and the product.
    ``lean``: the LayerNorm outputs are not kept (recomputed in backward) and the MLP keeps
    Wi's output only."""
    del window  # flash-class attention saves O(N) either way; math keeps full N x N probabilities
    if attention == "math":
        attn = 12 * w + 4 * heads * n + a * w
    else:  # RoPE'd q, k, v (a view keeps the whole Wqkv output; ``v_copy``: its own), out (= Wo input), lse
        attn = 2 * a * w + (1 if v_copy else 3) * a * w + a * w + 4 * heads
    norm_out = 0 if lean else a * w  # a LayerNorm's output, kept as the next Linear's input
    return a * w + 8 + norm_out + attn + a * w + 8 + norm_out + (2 if lean else 4) * a * hidden


def predictor_in(d: int, w: int, a: int, lean: bool = False) -> float:
    """Per token: the scattered sequence (mask tokens + visible tokens; ``lean``: none, the
    output gather keeps only its index), the input projection MLP (fc1, GELU, fc2 inputs;
    ``lean``: fc1 input and output), LayerNorm input + stats."""
    return (0 if lean else a * d) + (2 if lean else 3) * a * d + a * w + 8


def diffusion_rows(w: int, z: int, c: int, cout: int, depth: int, d: int, a: int, fused: bool,
                   learn_sigma: bool, lean: bool = False, vb_tensors: int = VB_TENSORS,
                   shared_silu: bool = True, vb_fp32: bool = True) -> dict:
    """Per diffusion row: embeddings, the adaLN blocks, the final layer, the losses.

    ``shared_silu``: SiLU(y) computed once for every adaLN projection (ivfast), else once per
    block and in the final layer (the release). ``lean``: the variational-bound term keeps only
    its inputs (the model output, the target, t; x_t is kept anyway). Unfused, the eps-MSE keeps
    its float32 difference; fused, its kernel keeps the model output. ``vb_fp32``: the VB term's
    saves are fp32 whatever ``d`` (ivfast); else in the head's dtype (the release's code).
    """
    del a
    embed = 256 * d + 2 * w * d + z * d + w * d + c * d  # t MLP inputs, z, y (SiLU input), x_t
    if fused:
        blocks = depth * (6 * w * d + 8) + w * d  # x, mod (3W), a, h per block + SiLU(y) once
        final = 3 * w * d + 8
        loss = out_kept = cout * d
    else:  # per block: x, LN(x), 1 + scale, modulated, fc1 out, SiLU out, h, mod (3W) [+ its SiLU(y)]
        silu = 0 if shared_silu else w * d
        blocks = depth * (10 * w * d + silu + 8) + (w * d if shared_silu else 0)
        final = 4 * w * d + silu + 8
        loss, out_kept = 4 * c, 0  # eps_hat - eps
    if learn_sigma and lean:
        loss += (cout * d - out_kept) + c * d + 8
    elif learn_sigma:
        loss += vb_tensors * c * (max(d, 4) if vb_fp32 else d) + 2 * c
    return {"embed": embed, "blocks": blocks, "final": final, "loss": loss}


def diffusion_head_rows(cfg: Config, way: Way, chunked: bool = False) -> dict:
    """:func:`diffusion_rows` for ``cfg``'s diffusion head run ``way``; ``chunked``: the head runs
    in chunks (inside a chunk the VB term is not recomputed: its saves die with the chunk)."""
    e, dcfg = cfg.model.encoder, cfg.model.diffusion
    c = 3 * e.tubelet_size * e.patch_size ** 2
    return diffusion_rows(dcfg.width, cfg.model.predictor.width, c, 2 * c if dcfg.learn_sigma else c, dcfg.depth,
                          way.diffusion_bytes, way.act_bytes, way.fused, dcfg.learn_sigma,
                          way.lean and not chunked, way.vb_tensors, way.shared_silu, way.vb_fp32)


# ----------------------------------------------------------------------------- the whole step


def _ckpt(name: str, way: Way) -> bool:
    return name in way.checkpointing


def estimate(cfg: Config, way: Way, zero_stage: int | None = None, world: int = 1,
             params: ParamCounts | None = None) -> MemoryEstimate:
    """Bytes of one Stage-1 training step of ``cfg`` run ``way`` on each of ``world`` ranks."""
    m, e, t = cfg.model, cfg.model.encoder, cfg.model.teacher
    zero = cfg.deepspeed.zero_stage if zero_stage is None else zero_stage
    s = shapes(cfg)
    a, B = way.act_bytes, s.batch
    params = params or count_params(cfg)
    est = MemoryEstimate(way=way.name, params=params)

    # static
    bucket_elems = cfg.deepspeed.reduce_bucket_size if way.bucket_elems is None else way.bucket_elems
    bucket = bucket_elems if (way.grad_bucket and cfg.deepspeed.contiguous_gradients) else 0
    st = static_bytes(params.total_trainable, zero, world, bucket)
    step_extra = st.pop("step: fp32 gradient partition")
    est.static = dict(st)
    est.static["teacher weights"] = params.teacher * way.teacher_param_bytes
    static = sum(est.static.values())

    # activations
    n_enc = s.cls + s.visible
    hidden = int(e.width * e.mlp_ratio)
    block = encoder_block(e.width, e.heads, hidden, n_enc, a, way.attention, way.fused, way.lean) * B * n_enc
    embedded = s.visible if way.embed_visible_only else s.frames * s.grid
    embed = encoder_embed(3 * e.tubelet_size * e.patch_size ** 2, e.width, a, way.fused) * B * embedded
    acts, trans = {}, {}
    chunk = way.diffusion_chunk_rows if chunking_allowed(zero) else 0  # ZeRO-3: plain autograd, as in the trainer
    if _ckpt("encoder", way):
        acts["encoder"] = embed + e.depth * a * e.width * B * n_enc
        trans["encoder recompute (one block)"] = block
    else:
        acts["encoder"] = embed + e.depth * block
    acts["align heads"] = (m.align.num_layers * align_head(e.width, t.width, a, way.lean,
                                                           way.teacher_stream_bytes) * B * s.visible
                           + pool(e.width, m.align.pool_heads, a, way.attention) * B * n_enc)
    rows = 0
    if m.recon != "none":
        p = m.predictor
        n_p = s.cls + s.frames * s.grid
        ids = [p.first_layer_id + i for i in range(p.depth)]
        layers = [predictor_layer(p.width, p.heads, p.mlp_hidden, n_p, None if i % p.global_every == 0 else p.window // 2,
                                  a, way.attention, way.lean, way.predictor_v_copy) * B * n_p for i in ids]
        pin = predictor_in(e.width, p.width, a, way.lean) * B * n_p
        if _ckpt("predictor", way):
            acts["predictor"] = pin + p.depth * a * p.width * B * n_p
            trans["predictor recompute (one layer)"] = max(layers)
        else:
            acts["predictor"] = pin + sum(layers)
        c = 3 * e.tubelet_size * e.patch_size ** 2
        if m.recon == "linear":
            acts["linear head"] = (a * p.width + 2 * a * c) * B * s.masked
        else:
            dcfg = m.diffusion
            rows = B * num_reconstructed(s.masked, way.reconstruction_ratio) * dcfg.batch_mul
            d, head_params = way.diffusion_bytes, params.trainable.get("diffusion head", 0)
            weight_copies = head_params * (d - a) if d > a else 0  # fp32 copies of bf16 weights (fp32 head)
            parts = diffusion_head_rows(cfg, way, chunked=bool(chunk))
            ckpt = _ckpt("diffusion", way)
            recompute = parts["blocks"] / dcfg.depth if ckpt else 0  # one block's internals, per row
            per_row = (parts["embed"] + parts["final"] + parts["loss"]
                       + (dcfg.depth * d * dcfg.width if ckpt else parts["blocks"]))
            if chunk:
                # kept for backward: the gradient w.r.t. z and the float32 parameter gradients
                acts["diffusion head"] = rows * p.width * a + head_params * 4
                # one chunk: its activations, a recomputed block, the layer gradients, its parameter gradients
                n = min(chunk, rows)
                trans["diffusion chunk (forward + backward)"] = ((per_row + recompute + 4 * dcfg.width * d) * n
                                                                 + head_params * a + weight_copies)
            else:
                acts["diffusion head"] = per_row * rows + weight_copies
                if ckpt:
                    trans["diffusion recompute (one block)"] = recompute * rows
    est.activations = acts

    # transients of the forward: the largest single working set
    enc_attn = 0 if way.attention != "math" else 8 * e.heads * n_enc * n_enc * B  # scores + probabilities
    trans["encoder MLP / attention"] = max(2 * a * hidden * B * n_enc, enc_attn)
    if m.recon != "none":
        p = m.predictor
        n_p = s.cls + s.frames * s.grid
        attn = 8 * p.heads * n_p * n_p * B if way.attention == "math" else 0
        # GeGLU: Wi's output, GELU, the product, their gradients; lean: three hidden-wide at most
        trans["predictor MLP / attention"] = max((3 if way.lean else 4) * a * p.mlp_hidden * B * n_p, attn)
    if rows and not chunk:
        d = way.diffusion_bytes
        trans["diffusion layer"] = 4 * m.diffusion.width * d * rows
        if way.lean and m.diffusion.learn_sigma:  # backward: the VB term again, 8192 rows at a time
            vb_d = max(d, 4) if way.vb_fp32 else d
            trans["diffusion VB recompute"] = way.vb_tensors * c * vb_d * min(rows, 8192)
    est.transients = trans

    # the teacher: outputs alive through the student forward, and its own working set
    bt, L, tw = B * s.frames, s.teacher_tokens, t.width
    k = m.align.num_layers
    tb = way.teacher_stream_bytes
    if way.teacher_visible_only:  # gathered at the visible tokens before the student runs
        est.teacher_outputs = k * B * s.visible * tw * tb
    else:
        est.teacher_outputs = k * bt * L * tw * tb
    if tb == 4:  # the release also keeps the visible-token fp32 targets it gathers
        est.teacher_outputs += k * B * s.visible * tw * 4
    compute = min(tb, 2)
    if way.teacher_eager:
        scores = bt * t.heads * L * L * (compute + 4 + compute)  # bf16 scores, fp32 softmax, bf16 probabilities
    else:
        scores = bt * t.heads * L * 4 * 2
    layer_ws = max(bt * L * (2 * tb * tw + 3 * compute * tw) + scores,  # x, LN(x), q, k, v + scores
                   bt * L * (tb * tw + 2 * compute * t.mlp_dim))  # x + MLP hidden and its GELU
    stack = 3 * k * bt * L * tw * tb  # kept layers + their normalised copies + the stack
    teacher_phase = static + max(k * bt * L * tw * tb + layer_ws, stack)

    act_total = sum(acts.values())
    est.phases = {
        "teacher forward": teacher_phase,
        "forward end / backward": static + act_total + est.teacher_outputs + max(trans.values()),
        "optimizer step": static + step_extra,
    }
    return est


def release_way(cfg: Config) -> Way:
    """The release's way of running ``cfg`` (:data:`ASSUMPTIONS`): ivfast under
    ``RELEASE_WAY`` plus the release's structure that ivfast has no switch for."""
    return replace(ivfast_way(with_overrides(cfg, RELEASE_WAY)), name="release", teacher_visible_only=False,
                   predictor_v_copy=False, embed_visible_only=False, shared_silu=False,
                   vb_tensors=RELEASE_VB_TENSORS, vb_fp32=False)


def ivfast_way(cfg: Config, checkpointing=None) -> Way:
    """ivfast's way from the config; ``checkpointing`` overrides ``model.checkpointing``."""
    m = cfg.model
    tp, dp = m.teacher.precision, m.diffusion.precision
    ck = tuple(m.checkpointing if checkpointing is None else checkpointing)
    teacher_attention = m.attention if m.teacher.attention == "same" else m.teacher.attention
    return Way("ivfast" + (" + checkpointing" if ck else ""), act_bytes=2, attention="flash",
               fused=bool(m.fused_kernels), diffusion_bytes=4 if dp == "fp32" else 2,
               teacher_param_bytes=4 if tp == "fp32" else 2, teacher_stream_bytes=4 if tp == "fp32" else 2,
               teacher_eager=teacher_attention == "math", checkpointing=ck,
               reconstruction_ratio=float(m.diffusion.reconstruction_ratio), lean=bool(m.lean_saves),
               teacher_visible_only=True, predictor_v_copy=True, diffusion_chunk_rows=int(m.diffusion.chunk_rows),
               bucket_elems=cfg.deepspeed.reduce_bucket_size)
