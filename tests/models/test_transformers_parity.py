"""Parity with the real libraries: tiny random ``transformers`` models, written with
``save_pretrained`` (safetensors + config.json), loaded by ivfast's loaders, give the same
numbers as the ``transformers`` model on the same inputs (float32, within 1e-5).

Skipped when ``transformers`` is not installed (it is in the ``test`` extra and in
requirements-dev.txt).

Index correspondences checked here:

- SigLIP: ``SigLIPTeacher(return_layers=[k, ...]).layers[j]`` is
  ``l2_normalize(hidden_states[return_layers[j]])`` of ``SiglipVisionModel(...,
  output_hidden_states=True)``: ``hidden_states[0]`` is the embeddings (patches +
  positions), ``hidden_states[k]`` the input of encoder layer k = the output of layer k - 1,
  ``hidden_states[depth]`` the output of the last layer *before* ``post_layernorm``
  (SigLIP does not tie it to ``last_hidden_state``). The teacher's ``pooled`` is
  ``l2_normalize(pooler_output)`` (the MAP head over ``last_hidden_state``), its ``saliency``
  the head's ``nn.MultiheadAttention`` weights averaged over heads. Both models consume the
  same tensor: the output of ``prepare_teacher_input`` (SigLIP normalisation, mean = std = 0.5).
- ModernBERT: predictor layer i holds checkpoint layer ``first_layer_id + i``; its input is
  ``hidden_states[first_layer_id + i]`` of ``ModernBertModel(inputs_embeds=...,
  output_hidden_states=True)`` (``hidden_states[0]`` is ``embeddings.norm(inputs_embeds)``)
  and its output ``hidden_states[first_layer_id + i + 1]``, except after the model's last
  layer: ModernBERT ties ``hidden_states[-1]`` to ``last_hidden_state`` = ``final_norm(...)``
  (the predictor has no final norm). Global layers: ``layer_types[i] == "full_attention"``
  (by default ``i % global_attn_every_n_layers == 0``), as the predictor's
  ``layer_id % global_every == 0``; local ones see ``|i - j| <= local_attention // 2``, as the
  predictor's ``window // 2``; RoPE theta ``rope_parameters["full_attention"]`` /
  ``["sliding_attention"]`` as ``rope_theta_global`` / ``rope_theta_local``.
"""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.models.predictor import Predictor
from ivfast.models.teacher import SigLIPTeacher, prepare_teacher_input, teacher_return_layers
from ivfast.models.weights import WeightLoadWarning, load_modernbert_predictor, load_siglip_teacher
from ivfast.ops.attention import use_backend

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

ATOL = 1e-5
HF_ATTENTION = ["eager", "sdpa"]  # the implementations transformers runs on a CPU (no flash-attn)
IVFAST_ATTENTION = ["sdpa", "math"]


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@torch.no_grad()
def randomise(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Every parameter moved off its init (norm weights and biases included), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------- SigLIP

IMG, PATCH, WIDTH, DEPTH, HEADS, MLP = 32, 8, 32, 3, 4, 64


def siglip_vision_config(attn: str):
    return transformers.SiglipVisionConfig(
        hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        image_size=IMG, patch_size=PATCH, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        attn_implementation=attn)


def hf_siglip_vision(tmp_path, attn: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(siglip_vision_config(attn)).eval()
    randomise(model, seed)
    model.save_pretrained(str(tmp_path / "siglip"))
    return model, str(tmp_path / "siglip")


def siglip_teacher(return_layers):
    return SigLIPTeacher(img_size=IMG, patch_size=PATCH, width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP,
                         return_layers=return_layers).freeze()


def teacher_pixels(seed: int = 3):
    """Frames as the teacher consumes them: a (B, C, T, H, W) clip normalised with ImageNet
    statistics, resized (40 -> 32) and re-normalised for SigLIP by prepare_teacher_input."""
    g = torch.Generator().manual_seed(seed)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    video = torch.rand(2, 3, 2, 40, 40, generator=g)
    video = (video - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)
    return prepare_teacher_input(video, IMG, mean, std)  # (4, 3, 32, 32)


@pytest.mark.parametrize("backend", IVFAST_ATTENTION)
@pytest.mark.parametrize("attn", HF_ATTENTION)
def test_siglip_teacher_matches_transformers(tmp_path, attn, backend):
    hf, path = hf_siglip_vision(tmp_path, attn)
    teacher = siglip_teacher(range(DEPTH + 1))
    report = load_siglip_teacher(teacher, path)
    assert report.layout == "hf" and report.prefix == "" and report.config_checked
    assert not report.missing and not report.unexpected and not report.notes and not report.ignored
    assert len(report.loaded) == len(list(teacher.parameters()))
    pixels = teacher_pixels()
    with torch.no_grad(), use_backend(backend):
        ref = hf(pixel_values=pixels, output_hidden_states=True)
        out = teacher(pixels)
    assert len(ref.hidden_states) == DEPTH + 1 and out.layers.shape[0] == DEPTH + 1
    for k in range(DEPTH + 1):  # teacher layer k <-> hidden_states[k]
        close(out.layers[k], F.normalize(ref.hidden_states[k], dim=-1))
    with torch.no_grad():
        # hidden_states[depth] is before post_layernorm; last_hidden_state after it
        close(teacher.post_layernorm(ref.hidden_states[DEPTH]), ref.last_hidden_state)
        pooled, _ = teacher.head(ref.last_hidden_state)  # the MAP head, unnormalised
        probe = hf.head.probe.expand(pixels.shape[0], 1, WIDTH)
        _, weights = hf.head.attention(probe, ref.last_hidden_state, ref.last_hidden_state, need_weights=True,
                                       average_attn_weights=True)
    close(pooled, ref.pooler_output)
    close(out.pooled, F.normalize(ref.pooler_output, dim=-1))
    close(out.saliency, weights[:, 0])


def test_siglip_release_return_layers_index_hidden_states(tmp_path):
    """The release's layer choice (depth - int(i * interval) - 1) indexes hidden_states directly."""
    hf, path = hf_siglip_vision(tmp_path, "sdpa", seed=1)
    chosen = teacher_return_layers(DEPTH, 2, 1.0)
    assert chosen == [DEPTH - 2, DEPTH - 1]
    teacher = siglip_teacher(chosen)
    load_siglip_teacher(teacher, path)
    pixels = teacher_pixels(seed=4)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True)
        out = teacher(pixels)
    for j, k in enumerate(chosen):
        close(out.layers[j], F.normalize(ref.hidden_states[k], dim=-1))
    close(out.pooled, F.normalize(ref.pooler_output, dim=-1))


def test_siglip_full_model_checkpoint(tmp_path):
    """A whole SiglipModel (text + vision towers, logit scale/bias): the vision tower is found
    under ``vision_model.``, the rest ignored; config.json's vision_config is checked."""
    torch.manual_seed(2)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=20,
                max_position_embeddings=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = siglip_vision_config("sdpa").to_dict()
    cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    model = transformers.SiglipModel(cfg).eval()
    randomise(model, 2)
    model.save_pretrained(str(tmp_path / "full"))
    teacher = siglip_teacher([0, DEPTH])
    report = load_siglip_teacher(teacher, str(tmp_path / "full"))
    assert report.prefix == "vision_model." and report.config_checked and not report.notes
    assert any(k.startswith("text_model.") for k in report.ignored) and "logit_scale" in report.ignored
    pixels = teacher_pixels(seed=5)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        out = teacher(pixels)
    close(out.layers[0], F.normalize(ref.hidden_states[0], dim=-1))
    close(out.layers[1], F.normalize(ref.hidden_states[DEPTH], dim=-1))
    close(out.pooled, F.normalize(ref.pooler_output, dim=-1))


# ----------------------------------------------------------------------------- ModernBERT

MW, MHEADS, MHID, MLAYERS, LOCAL, SEQ, IN_DIM = 32, 4, 48, 7, 8, 30, 24  # SEQ > LOCAL: windows matter


def modernbert_config(attn: str, **kw):
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    kw.setdefault("global_attn_every_n_layers", 3)
    return transformers.ModernBertConfig(
        hidden_size=MW, intermediate_size=MHID, num_hidden_layers=MLAYERS, num_attention_heads=MHEADS,
        local_attention=LOCAL, vocab_size=16, attn_implementation=attn, **special, **kw)


def hf_modernbert(tmp_path, attn: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = transformers.ModernBertModel(modernbert_config(attn, **kw)).eval()
    randomise(model, seed)
    model.save_pretrained(str(tmp_path / "modernbert"))
    return model, str(tmp_path / "modernbert")


def mb_predictor(depth=3, first_layer_id=MLAYERS - 3, **kw):
    torch.manual_seed(0)
    return Predictor(IN_DIM, width=MW, depth=depth, heads=MHEADS, mlp_hidden=MHID, window=LOCAL,
                     first_layer_id=first_layer_id, **kw)


def layer_outputs(layers):
    """Forward hooks recording each module's output; returns (outputs list, remove())."""
    outs = []
    handles = [m.register_forward_hook(lambda _m, _a, o: outs.append(o)) for m in layers]
    return outs, lambda: [h.remove() for h in handles]


def check_modernbert_layers(hf, p, first: int, backend: str):
    """Route 1, through transformers' own hidden_states: the predictor's layers (no in_proj)
    from hidden_states[first] reproduce hidden_states[first + i + 1]."""
    depth = len(p.layers)
    x = torch.randn(2, SEQ, MW, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = hf(inputs_embeds=x, output_hidden_states=True)
    assert len(ref.hidden_states) == MLAYERS + 1
    close(ref.hidden_states[-1], ref.last_hidden_state)  # tied: final_norm'd
    p_in = p.in_proj
    p.in_proj = nn.Identity()
    outs, remove = layer_outputs(p.layers)
    try:
        with torch.no_grad(), use_backend(backend):
            final = p(ref.hidden_states[first])
    finally:
        remove()
        p.in_proj = p_in
    for i in range(depth):
        cid = first + i
        if cid + 1 < MLAYERS:
            close(outs[i], ref.hidden_states[cid + 1])
        else:  # the model's last layer: hidden_states[-1] is after final_norm
            with torch.no_grad():
                close(hf.final_norm(outs[i]), ref.last_hidden_state)
    close(final, outs[-1])


def check_modernbert_forward(hf, p, first: int, backend: str):
    """Route 2, Predictor.forward end to end (in_proj included): in_proj's output is handed to
    transformers' layer ``first`` in place of its input (a forward pre-hook), so the HF model
    runs its own masks and RoPE; its layers' outputs are recorded by forward hooks."""
    x = torch.randn(2, SEQ, IN_DIM, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        start = p.in_proj(x)

    def inject(_module, args):
        return (start,) + tuple(args[1:])

    hook = hf.layers[first].register_forward_pre_hook(inject)
    ref_outs, remove = layer_outputs(hf.layers[first:first + len(p.layers)])
    try:
        with torch.no_grad():
            hf(inputs_embeds=torch.zeros(2, SEQ, MW))
    finally:
        hook.remove()
        remove()
    outs, remove = layer_outputs(p.layers)
    try:
        with torch.no_grad(), use_backend(backend):
            final = p(x)
    finally:
        remove()
    for got, want in zip(outs, ref_outs):
        close(got, want)
    close(final, ref_outs[-1])


@pytest.mark.parametrize("backend", IVFAST_ATTENTION)
@pytest.mark.parametrize("attn", HF_ATTENTION)
def test_modernbert_predictor_matches_transformers(tmp_path, attn, backend):
    hf, path = hf_modernbert(tmp_path, attn)
    p = mb_predictor()
    assert p.layer_ids == [4, 5, 6] and [l.is_global for l in p.layers] == [False, False, True]
    assert [hf.layers[i].attention_type for i in p.layer_ids] == ["sliding_attention", "sliding_attention",
                                                                   "full_attention"]
    report = load_modernbert_predictor(p, path)
    assert report.layer_map == {0: 4, 1: 5, 2: 6} and report.prefix == "" and report.config_checked
    assert not report.missing and not report.unexpected and not report.notes
    check_modernbert_layers(hf, p, 4, backend)
    check_modernbert_forward(hf, p, 4, backend)


def test_modernbert_middle_layers_and_global_first(tmp_path):
    """Layers 3..5 (global, local, local), not the last ones: every output is a hidden state."""
    hf, path = hf_modernbert(tmp_path, "sdpa", seed=1)
    p = mb_predictor(first_layer_id=3)
    report = load_modernbert_predictor(p, path, layers=[3, 4, 5])
    assert not report.notes and [l.is_global for l in p.layers] == [True, False, False]
    check_modernbert_layers(hf, p, 3, "sdpa")
    check_modernbert_forward(hf, p, 3, "sdpa")


def test_modernbert_other_pattern_and_thetas(tmp_path):
    """A transformers-5 config.json (global every 2nd layer, RoPE thetas 1000 / 50; written as
    layer_types and rope_parameters): a predictor built to match is exact and loads silently;
    the default predictor (every 3rd, 160000 / 10000) is warned about the pattern and both thetas."""
    hf, path = hf_modernbert(tmp_path, "sdpa", seed=2, global_attn_every_n_layers=2, global_rope_theta=1000.0,
                             local_rope_theta=50.0)
    cfg = json.loads((tmp_path / "modernbert" / "config.json").read_text())
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1000.0 and "global_rope_theta" not in cfg
    p = mb_predictor(global_every=2, rope_theta_global=1000.0, rope_theta_local=50.0)
    report = load_modernbert_predictor(p, path)
    assert not report.notes and [l.is_global for l in p.layers] == [True, False, True]
    check_modernbert_layers(hf, p, 4, "sdpa")
    check_modernbert_forward(hf, p, 4, "sdpa")
    with pytest.warns(WeightLoadWarning) as record:
        report = load_modernbert_predictor(mb_predictor(), path)
    text = " | ".join(str(w.message) for w in record)
    assert "global RoPE theta is 1000.0" in text and "local RoPE theta is 50.0" in text
    assert "attention pattern differs: checkpoint ['global', 'local', 'global'], predictor ['local', 'local', " \
           "'global']" in text


def test_modernbert_layer_types_without_period(tmp_path):
    """layer_types that no global_attn_every_n_layers describes: the loader reads layer_types."""
    types = ["full_attention"] + ["sliding_attention"] * (MLAYERS - 2) + ["full_attention"]
    hf, path = hf_modernbert(tmp_path, "sdpa", seed=3, layer_types=types)
    cfg = json.loads((tmp_path / "modernbert" / "config.json").read_text())
    cfg.pop("global_attn_every_n_layers", None)  # as a config made from layer_types alone
    (tmp_path / "modernbert" / "config.json").write_text(json.dumps(cfg))
    p = mb_predictor(first_layer_id=3)  # ids 3, 4, 5: global, local, local by the every-3rd rule
    with pytest.warns(WeightLoadWarning, match=r"attention pattern differs: checkpoint \['local', 'local', "
                                               r"'local'\], predictor \['global', 'local', 'local'\]"):
        load_modernbert_predictor(p, path, layers=[3, 4, 5])
    matching = mb_predictor(first_layer_id=4)  # ids 4, 5, 6: local, local, global, as layer_types
    report = load_modernbert_predictor(matching, path)
    assert not report.notes
    check_modernbert_layers(hf, matching, 4, "sdpa")
