"""A release Stage-1 state dict mapped into ivfast's whole Stage1Model (ivfast.models.release_stage1).

Part (a), always: a tiny Stage1Model with every tensor redrawn, written out in the release's
layout by an inverse written here (from the release's module names), mapped back bit-equal;
the errors for unexpected, missing, misshaped and unrepresentable keys.

Part (b), with ``IVFAST_RELEASE`` naming an InternVideo-Next checkout: the release's own
Stage-1 class at a tiny size (random weights, stand-ins for timm / flash-attn from
tests/release_stubs.py, a 6-layer ModernBERT of width 1024 -- the width the release hard-codes --
built without HF's slow init), mapped and loaded strictly, and compared on one clip + mask:
encoder tokens and the aligned layers, alignment heads, attention pool and final head, the
predictor's output at the masked tokens and the diffusion loss for fixed timesteps and noise.
The release's own Stage-1 forward cannot run here (its predictor loop calls HF's layers the
flash-attn varlen way, and it feeds every alignment head ``x_clip[idx]`` with idx the last block
index); its steps are replayed from its modules, as its forward does them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys

import pytest
import torch

from ivfast.models.diffloss import DiffusionConfig
from ivfast.models.encoder import EncoderConfig
from ivfast.models.predictor import PredictorConfig
from ivfast.models.release_stage1 import NOT_TAKEN, infer_stage1_config, map_stage1, not_taken
from ivfast.models.stage1 import AlignConfig, Stage1Config, Stage1Model

BERT_LAYER = ("attn_norm.weight", "attn.Wqkv.weight", "attn.Wo.weight", "mlp_norm.weight", "mlp.Wi.weight",
              "mlp.Wo.weight")


# ----------------------------------------------------------------------------- (a) the inverse


def tiny_cfg() -> Stage1Config:
    """Every value the inference cannot read set to the release's, so that inference gives it back."""
    return Stage1Config(
        num_frames=4, img_size=28, recon="diffusion", loss_weights=[1.0, 1.0, 1.0], teacher_width=40,
        encoder=EncoderConfig(width=32, depth=3, heads=4, mlp_ratio=4.0, block="release", num_cls_tokens=2,
                              layer_scale_init=1e-5, drop_path=0.1, patch_size=14, tubelet_size=2,
                              pos_learnable=True, gelu="tanh"),
        align=AlignConfig(num_layers=2, head_hidden=0, pool_heads=16, pool_dim=24),
        predictor=PredictorConfig(width=64, depth=2, heads=16, mlp_hidden=40, window=128, global_every=3,
                                  first_layer_id=26),
        diffusion=DiffusionConfig(width=24, depth=2, num_timesteps=1000, schedule="cosine", learn_sigma=True,
                                  batch_mul=1, precision="fp32"),
    )


@torch.no_grad()
def random_model(cfg: Stage1Config, seed: int = 0) -> Stage1Model:
    torch.manual_seed(seed)
    model = Stage1Model(cfg)
    for t in model.state_dict().values():  # no init value (zeros, ones) may hide a swap
        t.copy_(torch.randn(t.shape))
    return model


def to_release(sd: dict, cfg: Stage1Config) -> dict:
    """ivfast Stage1Model state dict -> the release's InternVideo_next_s1 layout (the inverse)."""
    e = cfg.encoder
    d, p, tt, ncls = e.width, e.patch_size, e.tubelet_size, e.num_cls_tokens
    out = {}
    # encoder: Conv3d kernel (D, C, tt, p, p); the pre-norm over a tubelet flattened as (tt, py, px, c)
    out["patch_embed.proj.weight"] = sd["encoder.patch_embed.proj.weight"].reshape(d, 3, tt, p, p)
    out["patch_embed.proj.bias"] = sd["encoder.patch_embed.proj.bias"]
    out["patch_embed.norm_before.weight"] = (sd["encoder.patch_embed.norm_in.weight"].reshape(3, tt, p, p)
                                             .permute(1, 2, 3, 0).reshape(-1))
    out["patch_embed.norm.weight"] = sd["encoder.patch_embed.norm_out.weight"]
    out["cls_token"] = sd["encoder.cls_token"]
    out["pos_embed"] = sd["encoder.pos.table"][None]
    for k, v in sd.items():
        if k.startswith("encoder.blocks."):
            out[k[len("encoder."):]] = v

    def mlp_head(src, dst):
        for a, b in (("fc1", "head.0"), ("fc2", "head.2"), ("norm", "norm")):
            for kind in ("weight", "bias"):
                out[f"{dst}.{b}.{kind}"] = sd[f"{src}.{a}.{kind}"]

    for i in range(cfg.align.num_layers):
        mlp_head(f"align_heads.{i}", f"clip_decoder.{i}")
    # the CLS rows of clip_pos_embed exist in the release (unused by its heads): any values
    out["clip_pos_embed"] = torch.cat([torch.randn(ncls, d), sd["align_pos.table"]])[None]
    for a, b in (("norm_q", "norm1_q"), ("norm_k", "norm1_k"), ("norm_v", "norm1_v"), ("proj", "cross_attn.proj")):
        for kind in ("weight", "bias"):
            out[f"clip_projector.{b}.{kind}"] = sd[f"pool.{a}.{kind}"]
    for x in "qkv":
        out[f"clip_projector.cross_attn.{x}.weight"] = sd[f"pool.{x}.weight"]
        out[f"clip_projector.cross_attn.{x}_bias"] = sd[f"pool.{x}_bias"]
    mlp_head("final_head", "final_clip_decoder")
    out["bert_mask_token"] = sd["mask_token"][None, None]
    out["diff_pos_embed"] = sd["predictor_pos.table"][None]
    mlp_head("predictor.in_proj", "to_bert_proj")
    for i in range(cfg.predictor.depth):
        for name in BERT_LAYER:
            out[f"bert_decoder.layers.{i}.{name}"] = sd[f"predictor.layers.{i}.{name}"]
    for k, v in sd.items():
        if k.startswith("diffloss.net."):
            out[k.replace(".norm.", ".in_ln.") if ".res_blocks." in k else k] = v
    return {k: v.clone() for k, v in out.items()}


# what a release Stage-1 model also stores and ivfast deliberately does not take
EXTRAS = {"bert_decoder.embeddings.tok_embeddings.weight": (7, 64), "bert_decoder.embeddings.norm.weight": (64,),
          "bert_decoder.final_norm.weight": (64,)}


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    model = random_model(cfg)
    sd = model.state_dict()
    release = to_release(sd, cfg)
    release.update({k: torch.randn(s) for k, s in EXTRAS.items()})
    return cfg, model, sd, release


def test_round_trip_is_bit_equal(tiny):
    cfg, _, sd, release = tiny
    assert infer_stage1_config(release, heads=4, img_size=28) == cfg
    mapped, consumed = map_stage1(release, infer_stage1_config(release, heads=4, img_size=28))
    assert list(mapped) == list(sd)  # every key, in the model's order
    for k, v in sd.items():
        assert mapped[k].dtype == v.dtype and torch.equal(mapped[k], v), k
    assert len(consumed) == len(set(consumed))
    assert set(consumed) == set(release) - set(EXTRAS)
    assert all(not_taken(k) for k in EXTRAS)
    fresh = Stage1Model(cfg)
    fresh.load_state_dict(mapped, strict=True)


def test_defaults_and_a_bf16_checkpoint(tiny):
    """Without hints: heads from the release's widths (none for 32: an error saying so), frames
    from 224 px frames; bf16 tensors come back as float32."""
    cfg, _, sd, release = tiny
    with pytest.raises(ValueError, match="heads"):
        map_stage1(release)
    bf16 = {k: v.to(torch.bfloat16) for k, v in release.items()}
    mapped, _ = map_stage1(bf16, cfg)
    assert all(v.dtype == torch.float32 for v in mapped.values())
    assert torch.equal(mapped["predictor.layers.1.mlp.Wi.weight"], sd["predictor.layers.1.mlp.Wi.weight"]
                       .to(torch.bfloat16).float())


def test_not_taken_is_documented():
    assert {why for _, why in NOT_TAKEN} and all(why for _, why in NOT_TAKEN)
    assert not_taken("bert_decoder.embeddings.tok_embeddings.weight")
    assert not_taken("bert_decoder.final_norm.weight")
    assert not_taken("bert_decoder.rotary_emb.full_attention_inv_freq")
    assert not_taken("bert_decoder.layers.0.attn.rotary_emb.inv_freq")
    for k in ("bert_decoder.layers.0.attn.Wqkv.weight", "clip_decoder.0.head.0.weight", "diffloss.net.input_proj.bias",
              "teacher.blocks.0.attn.qkv.weight"):
        assert not_taken(k) is None, k


def test_unexpected_keys_are_named(tiny):
    cfg, _, _, release = tiny
    bad = dict(release)
    bad["diffloss.net.extra.weight"] = torch.zeros(3)
    bad["clip_teacher.blocks.0.attn.qkv.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"2 unexpected release keys.*clip_teacher\.blocks\.0\.attn\.qkv\.weight, "
                                         r"diffloss\.net\.extra\.weight"):
        map_stage1(bad, cfg)


@pytest.mark.parametrize("drop,named", [
    ("bert_decoder.layers.1.mlp.Wo.weight", "predictor.layers.1.mlp.Wo.weight"),
    ("clip_projector.cross_attn.v_bias", "pool.v_bias"),
    ("diffloss.net.res_blocks.1.in_ln.bias", "diffloss.net.res_blocks.1.norm.bias"),
    ("clip_pos_embed", "align_pos.table"),
])
def test_missing_keys_name_the_unfilled_ivfast_key(tiny, drop, named):
    cfg, _, _, release = tiny
    bad = {k: v for k, v in release.items() if k != drop}
    with pytest.raises(ValueError, match=rf"ivfast keys left unfilled: {named.replace('.', '[.]')}.*{drop}"):
        map_stage1(bad, cfg)


def test_missing_encoder_key_is_named(tiny):
    cfg, _, _, release = tiny
    with pytest.raises(ValueError, match=r"blocks\.2\.ls2\.gamma"):
        map_stage1({k: v for k, v in release.items() if k != "blocks.2.ls2.gamma"}, cfg)


def test_shape_mismatches_are_named(tiny):
    cfg, _, _, release = tiny
    bad = dict(release)
    bad["diff_pos_embed"] = bad["diff_pos_embed"][:, :-1]
    bad["bert_mask_token"] = torch.zeros(1, 1, 5)
    with pytest.raises(ValueError, match=r"2 shape mismatches.*mask_token: \(5,\) vs \(32,\).*"
                                         r"predictor_pos\.table: \(9, 32\) vs \(10, 32\)"):
        map_stage1(bad, cfg)
    bad = dict(release, clip_pos_embed=torch.zeros(10))  # wrong rank for the CLS-row cut
    with pytest.raises(ValueError, match=r"clip_pos_embed: \(10,\) \(for align_pos\.table\)"):
        map_stage1(bad, cfg)


def test_what_ivfast_cannot_take_is_refused(tiny):
    cfg, _, _, release = tiny
    with pytest.raises(ValueError, match="module."):
        map_stage1({f"module.{k}": v for k, v in release.items()}, cfg)
    mse = {k: v for k, v in release.items() if not k.startswith("diffloss.")}
    mse.update({"mse_projector.head.0.weight": torch.zeros(64, 64), "mse_projector.norm.weight": torch.zeros(1176)})
    with pytest.raises(ValueError, match="MSE reconstruction head"):
        map_stage1(mse, cfg)
    with pytest.raises(ValueError, match="MSE reconstruction head"):
        infer_stage1_config(mse, heads=4, img_size=28)
    other = dict(release)
    other["final_clip_decoder.head.2.weight"] = torch.zeros(48, 24)
    with pytest.raises(ValueError, match="one teacher_width"):
        infer_stage1_config(other, heads=4, img_size=28)
    with pytest.raises(ValueError, match="recon='diffusion' only"):
        map_stage1(release, dataclasses.replace(cfg, recon="linear"))
    no_final = {k: v for k, v in release.items() if not k.startswith("final_clip_decoder.")}
    with pytest.raises(ValueError, match="final_clip_decoder"):
        infer_stage1_config(no_final, heads=4, img_size=28)


# ----------------------------------------------------------------------------- (b) the release's class

RELEASE = os.environ.get("IVFAST_RELEASE", "")
needs_release = pytest.mark.skipif(
    not RELEASE or not os.path.isfile(os.path.join(RELEASE, "models", "InternVideo_next_s1.py")),
    reason="IVFAST_RELEASE does not name an InternVideo-Next checkout")

BERT_LAYERS = 6  # the release keeps the last 5: ModernBERT ids 1..5 (3 global, the others local)
BERT_WINDOW = 16  # local attention window (half-width 8) < the 4 + 64 token sequence


@pytest.fixture(scope="module")
def s1_module():
    from tests.release_stubs import load_release_module

    before = set(sys.modules)
    sys.path.insert(0, RELEASE)  # its diffloss imports the checkout's top-level `diffusion` package
    try:
        module = load_release_module(RELEASE, "InternVideo_next_s1")
    finally:
        sys.path.remove(RELEASE)
        for name in set(sys.modules) - before:  # the checkout's `diffusion` off the top level again
            if name == "diffusion" or name.startswith("diffusion."):
                del sys.modules[name]
    return module


@contextlib.contextmanager
def tiny_modernbert():
    """The release builds ModernBERT-large's config and model inside its constructor: shrink the
    config (6 layers, window 16, MLP 32, vocab 16; width 1024 stays: the release hard-codes it)
    and skip HF's weight init (the test redraws every parameter)."""
    from transformers import ModernBertConfig as real_config
    from transformers import ModernBertForMaskedLM as real_mlm
    from transformers.initialization import no_init_weights

    # the release's `from transformers import ...` reads the module in sys.modules now (loading
    # HF's lazy submodules above may have put a new module object there)
    transformers = sys.modules["transformers"]

    def config(**kw):
        kw.update(num_hidden_layers=BERT_LAYERS, intermediate_size=32, local_attention=BERT_WINDOW, vocab_size=16,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        return real_config(**kw)

    def mlm(cfg):
        with no_init_weights():
            return real_mlm(cfg)

    transformers.ModernBertConfig, transformers.ModernBertForMaskedLM = config, mlm
    from transformers import ModernBertConfig as patched
    assert patched is config, "could not stand in for transformers.ModernBertConfig"
    try:
        yield
    finally:
        transformers.ModernBertConfig, transformers.ModernBertForMaskedLM = real_config, real_mlm


def build_release_stage1(module, fused: bool, ncls: int):
    from tests.release_stubs import TINY, randomize_

    cfg = dict(TINY, depth=3, cls_token_num=ncls)
    with tiny_modernbert(), contextlib.redirect_stdout(io.StringIO()):
        model = module.InternVideo2(
            use_flash_attn=fused, use_fused_rmsnorm=fused, use_fused_mlp=fused, clip_teacher_embed_dim=40,
            clip_teacher_final_dim=40, clip_norm_type="l2", clip_return_layer=2, clip_student_return_interval=1,
            diffloss_d=2, diffloss_w=48, num_sampling_steps="1000", diffusion_batch_mul=1, with_text_init=False,
            diffloss=True, **cfg)
    randomize_(model, seed=3)
    return model.eval(), cfg


def max_diff(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, max |ref|)."""
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    return (ours.double() - ref.double()).abs().max().item(), ref.double().abs().max().item()


@needs_release
@pytest.mark.parametrize("fused,ncls", [(True, 4), (False, 2)], ids=["fused", "unfused"])
@torch.no_grad()
def test_matches_the_release_stage1_model(s1_module, fused, ncls):
    from ivfast.ops.philox import philox_randn_reference
    from tests.release_stubs import fixed_clip

    torch.manual_seed(0)
    rel, rcfg = build_release_stage1(s1_module, fused, ncls)
    state = {k: v.clone() for k, v in rel.state_dict().items()}

    cfg = infer_stage1_config(state, heads=rcfg["num_heads"], img_size=rcfg["img_size"])
    assert (cfg.encoder.width, cfg.encoder.depth, cfg.encoder.num_cls_tokens, cfg.align.num_layers) == (64, 3, ncls, 2)
    assert (cfg.teacher_width, cfg.align.pool_dim, cfg.predictor.width, cfg.predictor.depth) == (40, 32, 1024, 5)
    assert (cfg.predictor.mlp_hidden, cfg.diffusion.width, cfg.diffusion.depth, cfg.diffusion.learn_sigma) == (
        32, 48, 2, True)
    # what the weights do not say, for this tiny release model
    cfg = dataclasses.replace(
        cfg, align=dataclasses.replace(cfg.align, pool_heads=rcfg["attn_pool_num_heads"]),
        encoder=dataclasses.replace(cfg.encoder, gelu="tanh" if fused else "erf"),
        predictor=dataclasses.replace(cfg.predictor, first_layer_id=BERT_LAYERS - 5, window=BERT_WINDOW))
    mapped, consumed = map_stage1(state, cfg)
    assert set(state) - set(consumed) == {k for k in state if not_taken(k)}
    assert {k.split(".")[1] for k in state if not_taken(k)} == {"embeddings", "final_norm"}
    ours = Stage1Model(cfg).eval()
    ours.load_state_dict(mapped, strict=True)

    # one clip, 16 of 64 tokens visible per sample
    video = fixed_clip(seed=1, batch=2, frames=rcfg["num_frames"], size=rcfg["img_size"])
    b, n = 2, ours.encoder.num_patches
    g = torch.Generator().manual_seed(2)
    visible_idx = torch.stack([torch.randperm(n, generator=g)[:16].sort().values for _ in range(b)])
    mask = torch.ones(b, n, dtype=torch.bool)
    mask.scatter_(1, visible_idx, False)
    masked_idx = torch.stack([row.nonzero()[:, 0] for row in mask])
    diffs = {}

    # -- the encoder: last tokens, and the blocks the alignment heads read
    layers = {}
    hooks = [rel.blocks[i].register_forward_hook(
        lambda mod, inp, out, i=i: layers.__setitem__(i, out[0] + out[1] if isinstance(out, tuple) else out))
        for i in ours.encoder.return_layers]
    x_rel, pooled_rel = rel(video, mask=mask, embed_only=True)
    for h in hooks:
        h.remove()
    enc = ours.encoder(ours.encoder.patchify(video), visible_idx, ours.encoder.token_grid(video.shape))
    diffs["encoder tokens"] = max_diff(enc.tokens, x_rel)
    diffs["encoder layers"] = max(max_diff(enc.layers[j], layers[i]) for j, i in enumerate(ours.encoder.return_layers))

    # -- alignment heads, as the release's forward adds clip_pos_embed (head j <- j-th returned block)
    c = rel.clip_pos_embed.shape[-1]
    cpe = rel.clip_pos_embed.repeat(b, 1, 1)
    cpe = torch.cat([cpe[:, :ncls], cpe[:, ncls:][~mask].reshape(b, -1, c)], dim=1)
    heads_rel = [dec((layers[i] + cpe)[:, ncls:]) for dec, i in zip(rel.clip_decoder, ours.encoder.return_layers)]
    pos = ours.align_pos()[visible_idx]
    heads_ours = [head(enc.layers[j][:, ncls:] + pos) for j, head in enumerate(ours.align_heads)]
    diffs["align heads"] = max(max_diff(o, r) for o, r in zip(heads_ours, heads_rel))
    diffs["attention pool"] = max_diff(ours.pool(enc.tokens), pooled_rel)
    final_rel = rel.final_clip_decoder(pooled_rel)
    diffs["final head"] = max_diff(ours.final_head(ours.pool(enc.tokens)), final_rel)

    # -- the predictor, as the release's forward_reconstruction_loss builds its input (no mask_target)
    bmt = rel.bert_mask_token.repeat(b, n, 1)
    bmt[~mask] = bmt[~mask] * 0.0 + x_rel[:, ncls:].flatten(0, 1)
    bmt = bmt + rel.diff_pos_embed[:, ncls:].repeat(b, 1, 1)
    seq = torch.cat([x_rel[:, :ncls] + rel.diff_pos_embed[:, :ncls].repeat(b, 1, 1), bmt], dim=1)
    bert = rel.bert_decoder  # HF's padded path over whole sequences (the release: flash varlen, same maths)
    bert.embeddings.norm, bert.final_norm = torch.nn.Identity(), torch.nn.Identity()
    z_rel = bert(inputs_embeds=rel.to_bert_proj(seq)).last_hidden_state[:, ncls:][mask].reshape(b, -1, 1024)
    from ivfast.models.predictor import predict_masked
    z_ours = predict_masked(ours.predictor, ours.predictor_pos(), ours.mask_token, enc, visible_idx, masked_idx)
    diffs["predictor"] = max_diff(z_ours, z_rel)

    # -- the diffusion loss for fixed timesteps and noise, and ivfast's whole forward against the release's losses
    target = rel.transform_tensor(video, rcfg["patch_size"])[mask].reshape(b, -1, 588)
    rows = target.shape[0] * target.shape[1]
    t = torch.randint(0, 1000, (rows,), generator=g)
    seeds = torch.randint(0, 2**31, (rows,), generator=g)
    eps = philox_randn_reference(seeds, 588)
    diff_rel = rel.diffloss.train_diffusion.training_losses(
        rel.diffloss.net, target.reshape(rows, -1), t, {"c": z_rel.reshape(rows, -1)}, noise=eps)["loss"].mean()
    teacher_layers = torch.nn.functional.normalize(torch.randn(2, b, 16, 40, generator=g), dim=-1)
    teacher_pooled = torch.nn.functional.normalize(torch.randn(b, 40, generator=g), dim=-1)
    out = ours(video, visible_idx, masked_idx, teacher_layers, teacher_pooled, t, seeds)
    layers_rel = torch.stack([(2 - 2 * (h * teacher_layers[j]).sum(-1)).mean() for j, h in enumerate(heads_rel)]).mean()
    final_loss_rel = (2 - 2 * (final_rel * teacher_pooled).sum(-1)).mean()
    diffs["loss_align_layers"] = max_diff(out["loss_align_layers"], layers_rel)
    diffs["loss_align_final"] = max_diff(out["loss_align_final"], final_loss_rel)
    diffs["loss_recon (diffusion)"] = max_diff(out["loss_recon"], diff_rel)
    print(f"\nrelease Stage-1 ({'fused' if fused else 'unfused'}, {ncls} CLS) vs ivfast, max |diff| fp32 (max |ref|):")
    for k, (v, ref) in diffs.items():
        print(f"  {k:24s} {v:.3g} ({ref:.3g})")
    assert diff_rel.abs() > 0.1 and z_rel.abs().max() > 0.1  # nothing trivially zero
    # 1e-5, relative to the values' size past 1 (the predictor's residual stream reaches ~10)
    bad = {k: v for k, v in diffs.items() if not v[0] <= 1e-5 * max(1.0, v[1])}
    assert not bad, bad
