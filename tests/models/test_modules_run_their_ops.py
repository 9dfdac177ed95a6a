"""The modules compute through ivfast.ops: the same values and gradients with the kernels on or
off and with lean saves on or off (then less is kept for backward)."""
import pytest
import torch

from ivfast.memory.saved_tensors import saved_bytes
from ivfast.models.diffloss import SimpleMLP
from ivfast.models.diffusion import GaussianDiffusion
from ivfast.models.heads import MLPHead
from ivfast.models.layers import Block, Mlp
from ivfast.models.predictor import ModernBertMLP, Predictor
from ivfast.ops import dispatch
from ivfast.ops.diffusion_noise import eps_mse_reference, q_sample_reference, row_seeds
from ivfast.ops.philox import philox_randn_reference


def _busy(module, seed=0, std=0.1):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _run(module, *inputs, fused=None, lean=None):
    module.zero_grad(set_to_none=True)
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    with dispatch.override(fused=fused, lean=lean):
        got, out = saved_bytes(lambda: module(*leaves), params=module.parameters(), exclude=leaves)
        out = out if isinstance(out, torch.Tensor) else out.tokens
        out.float().square().sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    grads.update({f"input{i}": x.grad for i, x in enumerate(leaves) if x.grad is not None})
    return out.detach(), grads, got.total


@pytest.mark.kernels
def test_diffusion_head_with_its_kernels_equals_its_references():
    torch.manual_seed(0)
    net = _busy(SimpleMLP(in_channels=100, width=96, out_channels=200, z_channels=24, depth=2))
    # small t: the timestep kernel's sin/cos of t * f is ~5e-7 * t from the reference's (tests/ops)
    x, z, t = torch.randn(37, 100), torch.randn(37, 24), torch.randint(0, 20, (37,))
    out_k, g_k, _ = _run(net, x, t, z, fused=True)
    out_r, g_r, _ = _run(net, x, t, z, fused=False)
    assert g_k.keys() == g_r.keys()
    for name, a, b in [("output", out_k, out_r)] + [(n, g_k[n], g_r[n]) for n in g_r]:
        # float32 summation-order noise, relative to the tensor's scale
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


def test_the_noise_references_are_the_diffusion_maths():
    """q_sample and eps-MSE with eps = tl.randn(seeds[r], c) (its PyTorch reference) are the
    GaussianDiffusion forward process and the mse loss, bit for bit."""
    d = GaussianDiffusion(1000, "cosine", learn_sigma=True)
    x, eps_hat = torch.randn(19, 588), torch.randn(19, 588)
    t = torch.randint(0, 1000, (19,))
    seeds = row_seeds(torch.tensor([3]), 19)
    noise = philox_randn_reference(seeds, 588)
    assert torch.equal(q_sample_reference(x, t, seeds, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod),
                       d.q_sample(x, t, noise))
    out = torch.cat([eps_hat, torch.zeros_like(eps_hat)], dim=1)
    assert torch.equal(eps_mse_reference(eps_hat, seeds), d.training_losses(out, x, x, t, noise)["mse"])


def _predictor():
    return Predictor(in_dim=32, width=32, depth=3, heads=4, mlp_hidden=48, window=8, global_every=3, first_layer_id=1)


@pytest.mark.parametrize("make,shape", [
    (lambda: Mlp(32, 128), (2, 9, 32)),
    (lambda: ModernBertMLP(32, 48), (2, 9, 32)),
    (lambda: MLPHead(32, 24, l2=True), (2, 9, 32)),
    (lambda: MLPHead(32, 24, l2=False), (2, 9, 32)),
    (lambda: Block(32, 4, style="release", layer_scale_init=0.5), (2, 9, 32)),
    (_predictor, (2, 11, 32)),
], ids=["mlp", "geglu", "align-head", "predictor-in-proj", "block", "predictor"])
def test_lean_saves_keep_values_and_gradients_and_keep_less(make, shape):
    torch.manual_seed(0)
    module = _busy(make())
    x = torch.randn(*shape)
    out_p, g_p, bytes_p = _run(module, x, lean=False)
    out_l, g_l, bytes_l = _run(module, x, lean=True)
    torch.testing.assert_close(out_l, out_p, rtol=1e-6, atol=1e-6)
    for name in g_p:
        torch.testing.assert_close(g_l[name], g_p[name], rtol=1e-5, atol=1e-6, msg=name)
    assert bytes_l < bytes_p, (bytes_l, bytes_p)


def test_lean_saves_are_plain_autograd_under_autocast():
    module = _busy(Mlp(32, 128))
    x = torch.randn(4, 32, requires_grad=True)
    with dispatch.override(lean=True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dispatch.lean_applies(x)
        out = module(x)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() != "_GeluMLPBackward"
