import pytest
import torch
import torch.nn.functional as F

from ivfast.models.heads import AttentionPool, MLPHead, cosine_align_loss


def test_mlp_head_unit_norm_and_shapes():
    torch.manual_seed(0)
    head = MLPHead(32, 48, hidden=64)
    assert head.fc1.weight.shape == (64, 32) and torch.all(head.fc1.bias == 0)
    y = head(torch.randn(2, 5, 32))
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(2, 5))
    raw = MLPHead(32, 48, l2=False)
    assert raw.fc1.weight.shape == (32, 32)
    z = raw(torch.randn(3, 32))
    # LayerNorm output (weight 1, bias 0): zero mean, unit variance, not unit l2 norm
    torch.testing.assert_close(z.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)
    assert (z.norm(dim=-1) - 1).abs().min() > 0.5


def test_attention_pool_shapes_and_permutation_invariance():
    torch.manual_seed(0)
    pool = AttentionPool(32, 4, 16)
    with torch.no_grad():
        for b in (pool.q_bias, pool.k_bias, pool.v_bias):
            assert torch.all(b == 0)
            b.normal_()
    x = torch.randn(3, 11, 32)
    y = pool(x)
    assert y.shape == (3, 16)
    perm = torch.randperm(11)
    torch.testing.assert_close(pool(x[:, perm]), y, atol=1e-5, rtol=1e-5)
    # sample-wise independence
    torch.testing.assert_close(pool(x[1:2]), y[1:2], atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in pool.parameters())


def test_attention_pool_matches_manual():
    torch.manual_seed(1)
    pool = AttentionPool(8, 2, 5)
    with torch.no_grad():
        for b in (pool.q_bias, pool.k_bias, pool.v_bias):
            b.normal_()
    x = torch.randn(2, 6, 8)
    q = pool.q(F.layer_norm(x.mean(1, keepdim=True), (8,))) + pool.q_bias
    k = pool.k(F.layer_norm(x, (8,))) + pool.k_bias
    v = pool.v(F.layer_norm(x, (8,))) + pool.v_bias
    outs = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        outs.append(a @ v[..., s])
    expect = pool.proj(torch.cat(outs, -1)[:, 0])
    torch.testing.assert_close(pool(x), expect, atol=1e-5, rtol=1e-5)


def test_cosine_align_loss():
    u = F.normalize(torch.randn(2, 7, 16), dim=-1)
    assert cosine_align_loss(u, u).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_align_loss(u, -u).item() == pytest.approx(4.0, abs=1e-6)
    v = F.normalize(torch.randn(2, 7, 16), dim=-1)
    expect = (2 - 2 * F.cosine_similarity(u, v, dim=-1)).mean()
    torch.testing.assert_close(cosine_align_loss(u, v), expect)
    assert cosine_align_loss(u, v).ndim == 0
