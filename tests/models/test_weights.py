"""Loading real-layout checkpoints: small random checkpoints in each public key layout,
checked against independent references (explicit math on the checkpoint's own tensors)."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from ivfast.models.predictor import Predictor
from ivfast.models.teacher import SigLIPTeacher
from ivfast.models.weights import (
    LoadReport,
    WeightLoadError,
    WeightLoadWarning,
    load_modernbert_predictor,
    load_siglip_teacher,
)

D, HEADS, DEPTH, IMG, P, MLP = 32, 4, 2, 16, 4, 64
L = (IMG // P) ** 2


def rnd(*shape, gen, scale=0.2):
    return torch.randn(*shape, generator=gen) * scale


def teacher(depth=DEPTH, heads=HEADS, return_layers=(0, 1, 2)):
    return SigLIPTeacher(img_size=IMG, patch_size=P, width=D, depth=depth, heads=heads, mlp_dim=MLP,
                         return_layers=[r for r in return_layers if r <= depth]).freeze()


def save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# ----------------------------------------------------------------------------- public SigLIP layouts


def hf_siglip(depth=DEPTH, prefix="vision_model.", naflex=False, seed=0):
    """A random SigLIP vision tower in the HF transformers key layout."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    if naflex:
        sd["embeddings.patch_embedding.weight"] = rnd(D, P * P * 3, gen=g)
    else:
        sd["embeddings.patch_embedding.weight"] = rnd(D, 3, P, P, gen=g)
    sd["embeddings.patch_embedding.bias"] = rnd(D, gen=g)
    sd["embeddings.position_embedding.weight"] = rnd(L, D, gen=g)
    for i in range(depth):
        b = f"encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            sd[b + ln + ".weight"] = 1 + rnd(D, gen=g)
            sd[b + ln + ".bias"] = rnd(D, gen=g)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[b + f"self_attn.{proj}.weight"] = rnd(D, D, gen=g)
            sd[b + f"self_attn.{proj}.bias"] = rnd(D, gen=g)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rnd(MLP, D, gen=g), rnd(MLP, gen=g)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rnd(D, MLP, gen=g), rnd(D, gen=g)
    sd["post_layernorm.weight"], sd["post_layernorm.bias"] = 1 + rnd(D, gen=g), rnd(D, gen=g)
    sd["head.probe"] = rnd(1, 1, D, gen=g, scale=1.0)
    sd["head.attention.in_proj_weight"] = rnd(3 * D, D, gen=g, scale=0.5)
    sd["head.attention.in_proj_bias"] = rnd(3 * D, gen=g)
    sd["head.attention.out_proj.weight"], sd["head.attention.out_proj.bias"] = rnd(D, D, gen=g), rnd(D, gen=g)
    sd["head.layernorm.weight"], sd["head.layernorm.bias"] = 1 + rnd(D, gen=g), rnd(D, gen=g)
    sd["head.mlp.fc1.weight"], sd["head.mlp.fc1.bias"] = rnd(MLP, D, gen=g), rnd(MLP, gen=g)
    sd["head.mlp.fc2.weight"], sd["head.mlp.fc2.bias"] = rnd(D, MLP, gen=g), rnd(D, gen=g)
    return {prefix + k: v for k, v in sd.items()}


def timm_siglip(depth=DEPTH, prefix="", seed=1):
    """A random SigLIP vision tower in the timm (big_vision-converted) key layout."""
    g = torch.Generator().manual_seed(seed)
    sd = {"patch_embed.proj.weight": rnd(D, 3, P, P, gen=g), "patch_embed.proj.bias": rnd(D, gen=g),
          "pos_embed": rnd(1, L, D, gen=g)}
    for i in range(depth):
        b = f"blocks.{i}."
        for ln in ("norm1", "norm2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + rnd(D, gen=g), rnd(D, gen=g)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = rnd(3 * D, D, gen=g), rnd(3 * D, gen=g)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rnd(D, D, gen=g), rnd(D, gen=g)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rnd(MLP, D, gen=g), rnd(MLP, gen=g)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rnd(D, MLP, gen=g), rnd(D, gen=g)
    sd["norm.weight"], sd["norm.bias"] = 1 + rnd(D, gen=g), rnd(D, gen=g)
    sd["attn_pool.latent"] = rnd(1, 1, D, gen=g, scale=1.0)
    sd["attn_pool.q.weight"], sd["attn_pool.q.bias"] = rnd(D, D, gen=g, scale=0.5), rnd(D, gen=g)
    sd["attn_pool.kv.weight"], sd["attn_pool.kv.bias"] = rnd(2 * D, D, gen=g, scale=0.5), rnd(2 * D, gen=g)
    sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"] = rnd(D, D, gen=g), rnd(D, gen=g)
    sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"] = 1 + rnd(D, gen=g), rnd(D, gen=g)
    sd["attn_pool.mlp.fc1.weight"], sd["attn_pool.mlp.fc1.bias"] = rnd(MLP, D, gen=g), rnd(MLP, gen=g)
    sd["attn_pool.mlp.fc2.weight"], sd["attn_pool.mlp.fc2.bias"] = rnd(D, MLP, gen=g), rnd(D, gen=g)
    return {prefix + k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------- independent references (float64)


def ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y if b is None else y + b


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def lin(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def heads_attend(q, k, v, h):
    """q (B, M, D), k/v (B, N, D) -> out (B, M, D), probs (B, h, M, N)."""
    b, m, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)
    probs = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // h)).softmax(-1)
    return (probs @ split(v)).transpose(1, 2).reshape(b, m, d), probs


def patches(x, order):
    b = x.shape[0]
    g = IMG // P
    t = x.reshape(b, 3, g, P, g, P)
    t = t.permute(0, 2, 4, 1, 3, 5) if order == "c,ph,pw" else t.permute(0, 2, 4, 3, 5, 1)
    return t.reshape(b, g * g, 3 * P * P)


def ref_hf(sd, x, depth=DEPTH, pre="vision_model."):
    """SigLIP vision tower + MAP head, written from the HF layout's tensors."""
    sd = {k[len(pre):]: v.double() for k, v in sd.items() if k.startswith(pre)}
    w = sd["embeddings.patch_embedding.weight"]
    order = "ph,pw,c" if w.dim() == 2 else "c,ph,pw"
    h = patches(x.double(), order) @ w.reshape(D, -1).T + sd["embeddings.patch_embedding.bias"]
    h = h + sd["embeddings.position_embedding.weight"]
    inputs = []
    for i in range(depth):
        inputs.append(h)
        b = f"encoder.layers.{i}."
        y = ln(h, sd[b + "layer_norm1.weight"], sd[b + "layer_norm1.bias"])
        o, _ = heads_attend(lin(y, sd, b + "self_attn.q_proj"), lin(y, sd, b + "self_attn.k_proj"),
                            lin(y, sd, b + "self_attn.v_proj"), HEADS)
        h = h + lin(o, sd, b + "self_attn.out_proj")
        y = ln(h, sd[b + "layer_norm2.weight"], sd[b + "layer_norm2.bias"])
        h = h + lin(gelu_tanh(lin(y, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    inputs.append(h)
    h = ln(h, sd["post_layernorm.weight"], sd["post_layernorm.bias"])
    wq, wk, wv = sd["head.attention.in_proj_weight"].chunk(3)
    bq, bk, bv = sd["head.attention.in_proj_bias"].chunk(3)
    q = sd["head.probe"].expand(h.shape[0], 1, D) @ wq.T + bq
    o, probs = heads_attend(q, h @ wk.T + bk, h @ wv.T + bv, HEADS)
    o = lin(o, sd, "head.attention.out_proj")
    o = o + lin(gelu_tanh(lin(ln(o, sd["head.layernorm.weight"], sd["head.layernorm.bias"]), sd, "head.mlp.fc1")),
                sd, "head.mlp.fc2")
    return inputs, o[:, 0], probs[:, :, 0].mean(1)


def ref_timm(sd, x, depth=DEPTH, pre=""):
    """The same model written from the timm layout's tensors (fused qkv as timm reshapes it:
    (B, N, 3, heads, hd); the pool's kv as (B, N, 2, heads, hd))."""
    sd = {k[len(pre):]: v.double() for k, v in sd.items() if k.startswith(pre)}
    h = patches(x.double(), "c,ph,pw") @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    h = h + sd["pos_embed"][0]
    b_, n = h.shape[:2]
    inputs = []
    for i in range(depth):
        inputs.append(h)
        b = f"blocks.{i}."
        y = ln(h, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        qkv = lin(y, sd, b + "attn.qkv").reshape(b_, n, 3, D)
        o, _ = heads_attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], HEADS)
        h = h + lin(o, sd, b + "attn.proj")
        h = h + lin(gelu_tanh(lin(ln(h, sd[b + "norm2.weight"], sd[b + "norm2.bias"]), sd, b + "mlp.fc1")), sd,
                    b + "mlp.fc2")
    inputs.append(h)
    h = ln(h, sd["norm.weight"], sd["norm.bias"])
    q = lin(sd["attn_pool.latent"].expand(b_, 1, D), sd, "attn_pool.q")
    kv = lin(h, sd, "attn_pool.kv").reshape(b_, n, 2, D)
    o, probs = heads_attend(q, kv[:, :, 0], kv[:, :, 1], HEADS)
    o = lin(o, sd, "attn_pool.proj")
    o = o + lin(gelu_tanh(lin(ln(o, sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"]), sd, "attn_pool.mlp.fc1")),
                sd, "attn_pool.mlp.fc2")
    return inputs, o[:, 0], probs[:, :, 0].mean(1)


def check_teacher(t, ref):
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    inputs, pooled, saliency = ref(x)
    with torch.no_grad():
        out = t(x)
    nrm = lambda z: z / z.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out.pooled.double(), nrm(pooled), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.saliency.double(), saliency, atol=1e-5, rtol=1e-4)
    want = torch.stack([nrm(inputs[i]) for i in t.return_layers])
    torch.testing.assert_close(out.layers.double(), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- SigLIP: loading


@pytest.mark.parametrize("prefix", ["vision_model.", ""])
def test_siglip_hf_layout_matches_reference(tmp_path, prefix):
    sd = hf_siglip(prefix=prefix)
    extra = {"text_model.embeddings.token_embedding.weight": torch.randn(10, D), "logit_scale": torch.ones(1),
             "logit_bias": torch.zeros(1)}
    path = save({**sd, **extra}, tmp_path / "siglip.safetensors")
    t = teacher()
    report = load_siglip_teacher(t, path)
    assert isinstance(report, LoadReport)
    assert report.layout == "hf" and report.prefix == prefix
    assert len(report.loaded) == len(list(t.parameters())) and not report.missing and not report.unexpected
    assert len(report.ignored) == 3 and report.checkpoint_layers == DEPTH
    assert "loaded" in report.summary()
    check_teacher(t, lambda x: ref_hf(sd, x, pre=prefix))


def test_siglip2_naflex_linear_patch_embedding(tmp_path):
    sd = hf_siglip(naflex=True, seed=3)
    t = teacher()
    load_siglip_teacher(t, save(sd, tmp_path / "naflex.safetensors"))
    check_teacher(t, lambda x: ref_hf(sd, x))


@pytest.mark.parametrize("prefix", ["", "visual.trunk."])
def test_siglip_timm_layout_matches_reference(tmp_path, prefix):
    sd = timm_siglip(prefix=prefix)
    extra = {"text.token_embedding.weight": torch.randn(10, D), "logit_scale": torch.ones(1)} if prefix else {}
    t = teacher()
    report = load_siglip_teacher(t, save({**sd, **extra}, tmp_path / "timm.safetensors"))
    assert report.layout == "timm" and report.prefix == prefix and len(report.ignored) == len(extra)
    check_teacher(t, lambda x: ref_timm(sd, x, pre=prefix))


def test_siglip_bf16_checkpoint_is_cast(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in hf_siglip().items()}
    t = teacher()
    report = load_siglip_teacher(t, save(sd, tmp_path / "bf16.safetensors"))
    assert report.source_dtypes == ["bfloat16"]
    assert t.head.probe.dtype == torch.float32
    torch.testing.assert_close(t.head.probe, sd["vision_model.head.probe"].float())


def test_siglip_sharded_and_directory(tmp_path):
    sd = hf_siglip()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save({k: sd[k] for k in ks}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for path in (tmp_path / "model.safetensors.index.json", tmp_path):
        t = teacher()
        load_siglip_teacher(t, str(path))
        check_teacher(t, lambda x: ref_hf(sd, x))


def test_siglip_truncation(tmp_path):
    sd = hf_siglip(depth=3)
    path = save(sd, tmp_path / "deep.safetensors")
    t = teacher(depth=2)
    with pytest.raises(WeightLoadError, match="3 layers, the teacher only 2.*allow_truncate"):
        load_siglip_teacher(t, path)
    report = load_siglip_teacher(t, path, allow_truncate=True)
    assert len(report.truncated) == 16 and all(".layers.2." in k for k in report.truncated)
    torch.testing.assert_close(t.encoder.layers[1].mlp.fc1.weight, sd["vision_model.encoder.layers.1.mlp.fc1.weight"])
    with pytest.raises(WeightLoadError, match="2 layers, the teacher 3"):
        load_siglip_teacher(teacher(depth=3), save(hf_siglip(depth=2), tmp_path / "shallow.safetensors"))


# ----------------------------------------------------------------------------- SigLIP: errors


def _params(t):
    return {n: p.clone() for n, p in t.named_parameters()}


def _unchanged(t, before):
    return all(torch.equal(p, before[n]) for n, p in t.named_parameters())


def test_siglip_wrong_shape_is_an_error_and_writes_nothing(tmp_path):
    sd = hf_siglip()
    sd["vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.randn(MLP + 1, D)
    t = teacher()
    before = _params(t)
    with pytest.raises(WeightLoadError, match=r"layers\.1\.mlp\.fc1\.weight: checkpoint \(65, 32\), teacher needs \(64, 32\)"):
        load_siglip_teacher(t, save(sd, tmp_path / "bad.safetensors"))
    assert _unchanged(t, before)


def test_siglip_position_table_of_another_resolution_is_an_error(tmp_path):
    sd = timm_siglip()
    sd["pos_embed"] = torch.randn(1, L * 4, D)
    with pytest.raises(WeightLoadError, match="pos_embed"):
        load_siglip_teacher(teacher(), save(sd, tmp_path / "pos.safetensors"))


def test_siglip_missing_key_is_an_error(tmp_path):
    sd = hf_siglip()
    del sd["vision_model.head.attention.in_proj_bias"]
    del sd["vision_model.post_layernorm.weight"]
    with pytest.raises(WeightLoadError, match="2 required keys missing.*in_proj_bias"):
        load_siglip_teacher(teacher(), save(sd, tmp_path / "missing.safetensors"))
    sd = timm_siglip()
    del sd["attn_pool.kv.weight"]
    with pytest.raises(WeightLoadError, match="attn_pool.kv.weight"):
        load_siglip_teacher(teacher(), save(sd, tmp_path / "missing_timm.safetensors"))


def test_siglip_unexpected_key_strict_and_lenient(tmp_path):
    sd = hf_siglip()
    sd["vision_model.encoder.layers.0.self_attn.q_norm.weight"] = torch.ones(D)
    path = save(sd, tmp_path / "extra.safetensors")
    with pytest.raises(WeightLoadError, match="map to nothing.*q_norm"):
        load_siglip_teacher(teacher(), path)
    with pytest.warns(WeightLoadWarning, match="unexpected"):
        report = load_siglip_teacher(teacher(), path, strict=False)
    assert report.unexpected == ["vision_model.encoder.layers.0.self_attn.q_norm.weight"]


def test_siglip_config_heads_checked(tmp_path):
    path = save(hf_siglip(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"num_attention_heads": 8}}))
    with pytest.raises(WeightLoadError, match="8 attention heads, the teacher has 4"):
        load_siglip_teacher(teacher(), path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"num_attention_heads": HEADS,
                                                                        "hidden_act": "gelu_pytorch_tanh"}}))
    assert load_siglip_teacher(teacher(), path).config_checked


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.pth", "weights.ckpt"])
def test_pickles_are_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(WeightLoadError, match="safetensors only"):
        load_siglip_teacher(teacher(), str(path))
    with pytest.raises(WeightLoadError, match="safetensors only"):
        load_modernbert_predictor(predictor(), str(path))


def test_pickle_named_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(WeightLoadError, match="safetensors only.*pickle"):
        load_siglip_teacher(teacher(), str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightLoadError, match="not a valid safetensors file"):
        load_siglip_teacher(teacher(), str(tmp_path / "junk.safetensors"))


def test_not_a_siglip_checkpoint(tmp_path):
    with pytest.raises(WeightLoadError, match="no SigLIP vision tower"):
        load_siglip_teacher(teacher(), save(modernbert(), tmp_path / "mb.safetensors"))


# ----------------------------------------------------------------------------- ModernBERT

MW, MH, MHID, NLAYERS, WINDOW = 32, 4, 48, 6, 8


def modernbert(n_layers=NLAYERS, prefix="model.", seed=2):
    """A random ModernBERT (MLM) checkpoint in the HF key layout; layer 0 has no attn_norm."""
    g = torch.Generator().manual_seed(seed)
    sd = {"embeddings.tok_embeddings.weight": rnd(50, MW, gen=g), "embeddings.norm.weight": 1 + rnd(MW, gen=g),
          "final_norm.weight": 1 + rnd(MW, gen=g)}
    for i in range(n_layers):
        b = f"layers.{i}."
        if i > 0:
            sd[b + "attn_norm.weight"] = 1 + rnd(MW, gen=g)
        sd[b + "attn.Wqkv.weight"] = rnd(3 * MW, MW, gen=g, scale=0.3)
        sd[b + "attn.Wo.weight"] = rnd(MW, MW, gen=g)
        sd[b + "mlp_norm.weight"] = 1 + rnd(MW, gen=g)
        sd[b + "mlp.Wi.weight"] = rnd(2 * MHID, MW, gen=g)
        sd[b + "mlp.Wo.weight"] = rnd(MW, MHID, gen=g)
    sd = {prefix + k: v for k, v in sd.items()}
    sd.update({"head.dense.weight": rnd(MW, MW, gen=g), "head.norm.weight": 1 + rnd(MW, gen=g),
               "decoder.bias": rnd(50, gen=g)})
    return sd


def predictor(depth=3, first_layer_id=3, heads=MH):
    torch.manual_seed(0)
    return Predictor(24, width=MW, depth=depth, heads=heads, mlp_hidden=MHID, window=WINDOW,
                     first_layer_id=first_layer_id)


def ref_modernbert_layer(sd, pre, x, layer_id):
    """A plain ModernBERT encoder layer (global every 3rd layer, RoPE theta 160000 / 10000, local
    attention of WINDOW tokens, i.e. |i - j| <= WINDOW // 2), written from the checkpoint's tensors."""
    w = lambda n: sd[f"{pre}layers.{layer_id}.{n}"].double()
    b, n, d = x.shape
    hd = d // MH
    is_global = layer_id % 3 == 0
    h = ln(x, w("attn_norm.weight"), None, eps=1e-5) if f"{pre}layers.{layer_id}.attn_norm.weight" in sd else x
    qkv = (h @ w("attn.Wqkv.weight").T).view(b, n, 3, MH, hd)
    q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
    theta = 160000.0 if is_global else 10000.0
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = lambda t: torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if not is_global:
        i = torch.arange(n)
        s = s.masked_fill((i[:, None] - i[None]).abs() > WINDOW // 2, float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ w("attn.Wo.weight").T
    a, gate = (ln(x, w("mlp_norm.weight"), None, eps=1e-5) @ w("mlp.Wi.weight").T).chunk(2, dim=-1)
    return x + (torch.nn.functional.gelu(a) * gate) @ w("mlp.Wo.weight").T


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_modernbert_last_layers_match_reference(tmp_path, prefix):
    sd = modernbert(prefix=prefix)
    p = predictor()
    in_proj = {n: t.clone() for n, t in p.in_proj.state_dict().items()}
    report = load_modernbert_predictor(p, save(sd, tmp_path / "mb.safetensors"))
    assert report.layer_map == {0: 3, 1: 4, 2: 5} and report.prefix == prefix
    assert len(report.loaded) == 18 and not report.missing and not report.unexpected and not report.notes
    assert len(report.ignored) == 6 and len(report.truncated) == 17  # layers 0..2 (layer 0 has 5 keys)
    assert report.kept and all(k.startswith("in_proj.") for k in report.kept)
    assert all(torch.equal(t, in_proj[n]) for n, t in p.in_proj.state_dict().items())
    x = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(7))  # 40 > window: local layers matter
    with torch.no_grad():
        out = p(x).double()
        h = p.in_proj(x).double()
    for lid in (3, 4, 5):
        h = ref_modernbert_layer(sd, prefix, h, lid)
    torch.testing.assert_close(out, h, atol=1e-4, rtol=1e-4)


def test_modernbert_layer_id_mismatch_warns(tmp_path):
    path = save(modernbert(), tmp_path / "mb.safetensors")
    with pytest.warns(WeightLoadWarning, match=r"checkpoint layers \[3, 4, 5\] loaded into predictor layers with ids "
                                               r"\[20, 21, 22\].*attention pattern differs"):
        report = load_modernbert_predictor(predictor(first_layer_id=20), path)
    assert report.notes


def test_modernbert_explicit_layers_and_layer_zero(tmp_path):
    sd = modernbert()
    path = save(sd, tmp_path / "mb.safetensors")
    p = predictor(first_layer_id=0)
    with pytest.warns(WeightLoadWarning, match="no attn_norm"):
        report = load_modernbert_predictor(p, path, layers=[0, 1, 2])
    assert report.missing == ["model.layers.0.attn_norm.weight"]
    assert torch.equal(p.layers[0].attn_norm.weight, torch.ones(MW))
    torch.testing.assert_close(p.layers[2].mlp.Wi.weight, sd["model.layers.2.mlp.Wi.weight"])
    with pytest.raises(WeightLoadError, match=r"layers \[9\] do not exist"):
        load_modernbert_predictor(predictor(), path, layers=[1, 2, 9])
    with pytest.raises(ValueError, match="depth 3"):
        load_modernbert_predictor(predictor(), path, layers=[1, 2])


def test_modernbert_errors(tmp_path):
    sd = modernbert()
    sd["model.layers.4.mlp.Wi.weight"] = torch.randn(2 * MHID + 2, MW)
    p = predictor()
    before = _params(p)
    with pytest.raises(WeightLoadError, match=r"layers\.4\.mlp\.Wi\.weight: checkpoint \(98, 32\), predictor needs \(96, 32\)"):
        load_modernbert_predictor(p, save(sd, tmp_path / "shape.safetensors"))
    assert _unchanged(p, before)
    sd = modernbert()
    del sd["model.layers.5.mlp_norm.weight"]
    with pytest.raises(WeightLoadError, match="required keys missing: model.layers.5.mlp_norm.weight"):
        load_modernbert_predictor(p, save(sd, tmp_path / "missing.safetensors"))
    sd = modernbert()
    sd["model.layers.5.attn.Wqkv.bias"] = torch.zeros(3 * MW)
    with pytest.raises(WeightLoadError, match="map to nothing.*Wqkv.bias"):
        load_modernbert_predictor(p, save(sd, tmp_path / "bias.safetensors"))
    with pytest.raises(WeightLoadError, match="has 2 layers, the predictor needs 3"):
        load_modernbert_predictor(p, save(modernbert(n_layers=2), tmp_path / "short.safetensors"))
    with pytest.raises(WeightLoadError, match="no ModernBERT layers"):
        load_modernbert_predictor(p, save(hf_siglip(), tmp_path / "siglip.safetensors"))


def test_modernbert_config_checked(tmp_path):
    os.makedirs(tmp_path / "mb")
    path = save(modernbert(), tmp_path / "mb" / "model.safetensors")
    cfg = {"num_attention_heads": 8, "global_attn_every_n_layers": 3, "local_attention": WINDOW}
    (tmp_path / "mb" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="8 attention heads, the predictor has 4"):
        load_modernbert_predictor(predictor(), str(tmp_path / "mb"))
    cfg.update(num_attention_heads=MH, local_attention=128, global_rope_theta=160000.0, local_rope_theta=10000.0)
    (tmp_path / "mb" / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(WeightLoadWarning, match="local_attention is 128"):
        report = load_modernbert_predictor(predictor(), path)
    assert report.config_checked
