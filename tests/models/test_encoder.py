import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from ivfast.models.encoder import EncoderOutput, VideoEncoder, patchify
from ivfast.models.layers import Block, DropPath, LayerScale, RMSNorm, count_parameters
from ivfast.models.pos_embed import PositionTable
from ivfast.ops.sincos import sincos_3d


def _embed(enc, video, idx=None):
    return enc.embed(enc.patchify(video), enc.token_grid(video.shape), idx)

def tiny(**kw):
    cfg = dict(img_size=28, patch_size=7, num_frames=4, width=32, depth=3, heads=2, drop_path=0.0)
    cfg.update(kw)
    return VideoEncoder(**cfg)


def random_visible(b, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])


@pytest.mark.parametrize("block", ["release", "plain"])
@pytest.mark.parametrize("num_cls", [0, 4])
def test_output_shapes(block, num_cls):
    enc = tiny(block=block, num_cls_tokens=num_cls, return_layers=[1, 2]).eval()
    assert enc.grid == (4, 4, 4) and enc.num_patches == 64 and enc.num_cls == num_cls and enc.width == 32
    assert isinstance(enc.pos, PositionTable)
    video = torch.randn(2, 3, 4, 28, 28)
    out = enc(video)
    assert isinstance(out, EncoderOutput) and out.num_cls == num_cls
    assert out.tokens.shape == (2, num_cls + 64, 32)
    assert [t.shape for t in out.layers] == [(2, num_cls + 64, 32)] * 2
    idx = random_visible(2, 64, 16)
    out_v = enc(video, idx)
    assert out_v.tokens.shape == (2, num_cls + 16, 32)
    assert out_v.patch_tokens.shape == (2, 16, 32) and out_v.cls_tokens.shape == (2, num_cls, 32)
    # all tokens visible == no mask
    full_idx = torch.arange(64).expand(2, -1)
    torch.testing.assert_close(enc(video, full_idx).tokens, out.tokens)


def test_embed_plain_matches_conv3d_and_manual_gather():
    torch.manual_seed(0)
    enc = tiny(block="plain", num_cls_tokens=2, tubelet_size=2, pos_learnable=True)
    with torch.no_grad():
        enc.pos.table.normal_()  # make every row distinct, CLS rows included
    video = torch.randn(2, 3, 4, 28, 28)
    idx = random_visible(2, enc.num_patches, 10, seed=1)
    got = _embed(enc, video, idx)
    # manual: a Conv3d with the same weights gives the (t, y, x) grid; flatten t-major
    w = enc.patch_embed.proj.weight.reshape(32, 3, 2, 7, 7)
    grid = F.conv3d(video, w, enc.patch_embed.proj.bias, stride=(2, 7, 7))  # (B, D, 2, 4, 4)
    t, h, ww = grid.shape[2:]
    pos = enc.pos.table[2:]
    for b in range(2):
        for m, n in enumerate(idx[b].tolist()):
            ti, y, x = n // (h * ww), (n // ww) % h, n % ww
            expect = grid[b, :, ti, y, x] + pos[n]
            torch.testing.assert_close(got[b, 2 + m], expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[b, :2], enc.cls_token[0] + enc.pos.table[:2])


def test_embed_release_matches_manual():
    torch.manual_seed(0)
    enc = tiny(block="release", num_cls_tokens=0, pos_learnable=False)
    with torch.no_grad():
        enc.patch_embed.norm_in.weight.uniform_(0.5, 1.5)
        enc.patch_embed.norm_out.weight.uniform_(0.5, 1.5)
    video = torch.randn(2, 3, 4, 28, 28)
    idx = random_visible(2, 64, 7, seed=2)
    got = _embed(enc, video, idx)

    def rms(x, wt):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * wt

    pe = enc.patch_embed
    patches = rearrange(video, "b c (t a) (h p) (w q) -> b (t h w) (c a p q)", a=1, p=7, q=7)
    tok = rms(F.linear(rms(patches, pe.norm_in.weight), pe.proj.weight, pe.proj.bias), pe.norm_out.weight)
    tok = tok + sincos_3d(32, 4, 4, 4)
    expect = torch.stack([tok[b, idx[b]] for b in range(2)])
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(patchify(video, 7, 1), patches)


def test_return_layers_order_and_values():
    enc = tiny(depth=4, return_layers=[3, 0, 2]).eval()
    assert enc.return_layers == (0, 2, 3)
    video = torch.randn(1, 3, 4, 28, 28)
    out = enc(video)
    x = _embed(enc, video)
    manual = []
    for blk in enc.blocks:
        x = blk(x)
        manual.append(x)
    assert len(out.layers) == 3
    for got, i in zip(out.layers, (0, 2, 3)):
        torch.testing.assert_close(got, manual[i])
    torch.testing.assert_close(out.tokens, manual[-1])
    assert tiny(depth=4, return_layers=[-1]).return_layers == (3,)
    with pytest.raises(ValueError):
        tiny(depth=4, return_layers=[4])


def test_drop_path_rates_and_init():
    enc = tiny(depth=5, drop_path=0.2, layer_scale_init=1e-4)
    rates = [b.drop_path1.p for b in enc.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert all(isinstance(b.ls1, LayerScale) and torch.all(b.ls1.gamma == 1e-4) for b in enc.blocks)
    assert all(torch.all(b.attn.proj.bias == 0) for b in enc.blocks)
    assert enc.blocks[0].attn.qkv.bias is None and isinstance(enc.blocks[0].attn.q_norm, RMSNorm)
    plain = tiny(block="plain")
    assert plain.blocks[0].attn.qkv.bias is not None and isinstance(plain.blocks[0].norm1, torch.nn.LayerNorm)
    assert isinstance(plain.blocks[0].ls1, torch.nn.Identity)
    std = enc.blocks[0].mlp.fc1.weight.std().item()
    assert 0.01 < std < 0.03


def test_names_for_no_weight_decay():
    enc = tiny(num_cls_tokens=4)
    for name, p in enc.named_parameters():
        if p.ndim == 1 and not name.endswith("bias"):
            assert "norm" in name or name.endswith("gamma"), name
    names = dict(enc.named_parameters())
    assert "pos.table" in names and "cls_token" in names
    assert "pos" in "pos.table" and "token" in "cls_token"


@pytest.mark.parametrize("block", ["release", "plain"])
def test_gradients_reach_every_parameter(block):
    torch.manual_seed(0)
    enc = tiny(block=block, num_cls_tokens=2, return_layers=[0, 1]).train()
    video = torch.randn(2, 3, 4, 28, 28)
    out = enc(video, random_visible(2, 64, 20))
    loss = out.tokens.pow(2).mean() + sum(t.pow(2).mean() for t in out.layers)
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_drop_path_module():
    dp = DropPath(0.5).train()
    x = torch.ones(1000, 3)
    y = dp(x)
    kept = y[:, 0] != 0
    assert torch.all(y[kept] == 2.0) and 300 < kept.sum() < 700
    assert torch.equal(dp.eval()(x), x)


def test_block_styles_rejects_unknown():
    with pytest.raises(ValueError):
        Block(32, 2, style="fancy")
    with pytest.raises(ValueError):
        tiny(block="fancy")


def expected_release_params(width, depth, mlp_ratio=4.0, patch=14, tubelet=1, chans=3, frames=16, img=224, num_cls=4):
    """Hand count for the release-style encoder with a learnable position table."""
    d = width
    hidden = int(d * mlp_ratio)
    p = chans * tubelet * patch * patch  # 588
    n = (frames // tubelet) * (img // patch) ** 2  # 4096
    patch_embed = p + (p * d + d) + d  # RMSNorm(p), Linear(p, d), RMSNorm(d)
    cls = num_cls * d
    pos = (num_cls + n) * d
    block = (
        d  # norm1 (RMSNorm weight)
        + 3 * d * d  # qkv, no bias
        + 2 * d  # q_norm, k_norm
        + d * d + d  # proj
        + d  # ls1
        + d  # norm2
        + d * hidden + hidden  # fc1
        + hidden * d + d  # fc2
        + d  # ls2
    )
    return patch_embed + cls + pos + depth * block


@pytest.mark.parametrize("width,depth,heads", [(768, 12, 12), (1024, 24, 16)])
def test_param_count_vit_b_and_l(width, depth, heads):
    with torch.device("meta"):
        enc = VideoEncoder(width=width, depth=depth, heads=heads, block="release", num_cls_tokens=4, pos_learnable=True)
    assert enc.num_patches == 4096
    assert count_parameters(enc) == expected_release_params(width, depth)
    if width == 768:
        # sanity on the scale: 88.65 M, of which 3.15 M is the position table
        assert count_parameters(enc) == 88_650_828 and enc.pos.table.numel() == 4100 * 768
