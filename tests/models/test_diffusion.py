"""Tests of ivfast.models.diffusion against formulas written out independently here."""
import math

import pytest
import torch

from ivfast.models.diffusion import GaussianDiffusion

T = 1000


def _abar_closed(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _cosine_alphas_cumprod_reference(n):
    out, prod = [], 1.0
    for i in range(n):
        beta = 1.0 - _abar_closed((i + 1) / n) / _abar_closed(i / n)
        prod *= 1.0 - min(beta, 0.999)
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------- schedules
def test_cosine_alphas_cumprod_closed_form():
    d = GaussianDiffusion(T, "cosine")
    ac = d.alphas_cumprod
    assert ac.dtype == torch.float64 and ac.shape == (T,)
    torch.testing.assert_close(ac, _cosine_alphas_cumprod_reference(T), rtol=1e-12, atol=1e-15)
    # away from the capped tail this is just abar((i+1)/T) / abar(0)
    ref_uncapped = torch.tensor([_abar_closed((i + 1) / T) / _abar_closed(0.0)
                                 for i in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(ac[:-1], ref_uncapped, rtol=1e-9, atol=1e-12)
    assert d.betas.max().item() == pytest.approx(0.999)
    assert bool((ac[1:] < ac[:-1]).all())
    assert ac[0].item() > 0.9999 and ac[0].item() < 1.0
    assert ac[-1].item() < 1e-6
    for name in ("betas", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        arr = getattr(d, name)
        assert arr.dtype == torch.float64 and arr.shape == (T,), name
        assert torch.isfinite(arr).all(), name
    torch.testing.assert_close(d.alphas_cumprod_prev[1:], ac[:-1])
    assert d.alphas_cumprod_prev[0].item() == 1.0


def test_linear_schedule():
    for n in (1000, 250):
        d = GaussianDiffusion(n, "linear")
        s = 1000.0 / n
        ref = torch.tensor([s * 1e-4 + (s * 0.02 - s * 1e-4) * i / (n - 1) for i in range(n)],
                           dtype=torch.float64)
        torch.testing.assert_close(d.betas, ref, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - ref, 0))


def test_unknown_schedule():
    with pytest.raises(ValueError):
        GaussianDiffusion(10, "quadratic")


# ----------------------------------------------------------------------------- q_sample
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_sample_closed_form(dtype):
    d = GaussianDiffusion(T, "cosine")
    g = torch.Generator().manual_seed(0)
    M, C = 37, 11
    x = torch.randn(M, C, generator=g, dtype=dtype)
    noise = torch.randn(M, C, generator=g, dtype=dtype)
    t = torch.randint(0, T, (M,), generator=g)
    t[0], t[1] = 0, T - 1
    out = d.q_sample(x, t, noise)
    assert out.dtype == dtype and out.shape == (M, C)
    ref_ac = _cosine_alphas_cumprod_reference(T)
    a = ref_ac[t].unsqueeze(1)
    ref = (a.sqrt() * x.double() + (1 - a).sqrt() * noise.double()).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # t = 0 is nearly clean, t = T-1 nearly pure noise
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=0.05)
    torch.testing.assert_close(out[1], noise[1], rtol=0, atol=1e-3)


def test_extract_broadcast_and_dtype():
    d = GaussianDiffusion(T, "cosine")
    t = torch.tensor([0, 5, 999])
    x = torch.zeros(3, 4, 2, dtype=torch.float32)
    v = d.extract("sqrt_alphas_cumprod", t, x)
    assert v.shape == (3, 1, 1) and v.dtype == torch.float32
    with pytest.raises(ValueError):
        d.extract("betas", torch.tensor([1, 2]), x)


# ----------------------------------------------------------------------------- posterior
def test_posterior_matches_bayes_rule():
    d = GaussianDiffusion(T, "cosine")
    ac = _cosine_alphas_cumprod_reference(T)
    g = torch.Generator().manual_seed(1)
    M, C = 64, 5
    t = torch.randint(1, T, (M,), generator=g)
    t[0], t[1] = 1, T - 1
    x0 = torch.randn(M, C, generator=g, dtype=torch.float64)
    xt = torch.randn(M, C, generator=g, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)

    # p(x_{t-1} | x_0) = N(sqrt(ac_{t-1}) x0, 1 - ac_{t-1});  p(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t)
    ac_t = ac[t].unsqueeze(1)
    ac_p = ac[t - 1].unsqueeze(1)
    a_t = ac_t / ac_p
    b_t = 1 - a_t
    precision = a_t / b_t + 1 / (1 - ac_p)
    ref_var = 1 / precision
    ref_mean = ref_var * (a_t.sqrt() * xt / b_t + ac_p.sqrt() * x0 / (1 - ac_p))
    torch.testing.assert_close(var, ref_var.expand(M, C), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_var, ref_var.log().expand(M, C), rtol=1e-9, atol=1e-9)


def test_posterior_at_t0():
    d = GaussianDiffusion(T, "cosine")
    x0 = torch.randn(3, 4, dtype=torch.float64)
    xt = torch.randn(3, 4, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    # clipped log-variance: entry 0 is entry 1
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    torch.testing.assert_close(log_var, torch.full_like(x0, math.log(d.posterior_variance[1].item())))


# ----------------------------------------------------------------------------- losses
def _setup(M=16, C=6, seed=0, t=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(M, C, generator=g, dtype=dtype) * 2 - 1
    noise = torch.randn(M, C, generator=g, dtype=dtype)
    if t is None:
        t = torch.randint(0, T, (M,), generator=g)
    out = torch.randn(M, 2 * C, generator=g, dtype=dtype) * 0.5
    out[:, C:] = out[:, C:].clamp(-1, 1)
    return x0, noise, t, out


def test_mse_hand_computation_no_sigma():
    d = GaussianDiffusion(T, "cosine", learn_sigma=False)
    x0, noise, t, out = _setup()
    C = x0.shape[1]
    xt = d.q_sample(x0, t, noise)
    losses = d.training_losses(out[:, :C], x0, xt, t, noise)
    assert set(losses) == {"mse", "loss"}
    ref = ((out[:, :C] - noise) ** 2).sum(1) / C
    torch.testing.assert_close(losses["mse"], ref)
    torch.testing.assert_close(losses["loss"], ref)
    assert losses["mse"].shape == (x0.shape[0],)


def _ref_kl_bits(x0, xt, t, eps, v, ac):
    """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) via torch.distributions, bits/dim."""
    ac_t = ac[t].unsqueeze(1)
    ac_p = ac[t - 1].unsqueeze(1)
    a_t = ac_t / ac_p
    b_t = 1 - a_t
    post_var = b_t * (1 - ac_p) / (1 - ac_t)
    post_mean = (ac_p.sqrt() * b_t * x0 + a_t.sqrt() * (1 - ac_p) * xt) / (1 - ac_t)
    x0_hat = (xt - (1 - ac_t).sqrt() * eps) / ac_t.sqrt()
    model_mean = (ac_p.sqrt() * b_t * x0_hat + a_t.sqrt() * (1 - ac_p) * xt) / (1 - ac_t)
    frac = (v + 1) / 2
    model_logvar = frac * b_t.log() + (1 - frac) * post_var.log()
    q = torch.distributions.Normal(post_mean, post_var.sqrt().expand_as(x0))
    p = torch.distributions.Normal(model_mean, (0.5 * model_logvar).exp())
    return torch.distributions.kl_divergence(q, p).mean(1) / math.log(2)


def test_vb_kl_branch_matches_reference_and_nonnegative():
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    ac = _cosine_alphas_cumprod_reference(T)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(1, T, (32,), generator=g)
    x0, noise, t, out = _setup(M=32, t=t)
    C = x0.shape[1]
    xt = d.q_sample(x0, t, noise)
    losses = d.training_losses(out, x0, xt, t, noise)
    assert set(losses) == {"mse", "vb", "loss"}
    assert (losses["vb"] >= 0).all()
    ref = _ref_kl_bits(x0, xt, t, out[:, :C], out[:, C:], ac)
    torch.testing.assert_close(losses["vb"], ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # when the model's eps is the true noise and v picks the posterior variance, KL = 0
    exact = torch.cat([noise, torch.full_like(noise, -1.0)], 1)
    zero = d.training_losses(exact, x0, xt, t, noise)["vb"]
    torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-8)


def test_vb_gradient_only_through_variance_channels():
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    x0, noise, t, out = _setup(M=24, dtype=torch.float32)
    t[0] = 0
    C = x0.shape[1]
    out = out.clone().requires_grad_(True)
    xt = d.q_sample(x0, t, noise)
    losses = d.training_losses(out, x0, xt, t, noise)
    losses["vb"].sum().backward()
    assert (out.grad[:, :C] == 0).all()
    assert out.grad[:, C:].abs().sum() > 0
    out.grad = None
    losses = d.training_losses(out, x0, xt, t, noise)
    losses["mse"].sum().backward()
    assert (out.grad[:, C:] == 0).all()
    assert out.grad[:, :C].abs().sum() > 0


def _approx_cdf(x):
    return 0.5 * (1 + torch.tanh((2 / math.pi) ** 0.5 * (x + 0.044715 * x ** 3)))


def test_decoder_nll_at_t0():
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    M, C = 8, 6
    t = torch.zeros(M, dtype=torch.long)
    x0, noise, t, out = _setup(M=M, C=C, t=t)
    x0[0, 0], x0[1, 1] = -1.0, 1.0  # exercise both open edge bins
    xt = d.q_sample(x0, t, noise)
    vb = d.training_losses(out, x0, xt, t, noise)["vb"]
    assert torch.isfinite(vb).all() and (vb > 0).all()

    # reference: model mean from eps, learned-range log-variance at t = 0 (both ends = log var~_1 / log beta_0)
    ac = _cosine_alphas_cumprod_reference(T)
    eps, v = out[:, :C], out[:, C:]
    x0_hat = (xt - (1 - ac[0]).sqrt() * eps) / ac[0].sqrt()
    mean = x0_hat  # posterior at t=0: coef1 = 1, coef2 = 0
    b0 = 1 - ac[0]
    b1 = 1 - ac[1] / ac[0]
    var1 = b1 * (1 - ac[0]) / (1 - ac[1])
    logvar = (v + 1) / 2 * b0.log() + (1 - (v + 1) / 2) * var1.log()
    sd = (0.5 * logvar).exp()
    hi = _approx_cdf((x0 + 1 / 255 - mean) / sd)
    lo = _approx_cdf((x0 - 1 / 255 - mean) / sd)
    p = torch.where(x0 < -0.999, hi, torch.where(x0 > 0.999, 1 - lo, hi - lo))
    ref = -(p.clamp(min=1e-12).log()).mean(1) / math.log(2)
    torch.testing.assert_close(vb, ref, rtol=1e-6, atol=1e-8)

    # the t == 0 branch differs from what the KL branch would give for the same inputs
    kl_like = _ref_kl_bits(x0, xt, torch.ones_like(t), eps, v, ac)
    assert not torch.allclose(vb, kl_like)

    # exact mean (eps_hat = noise) and v = -1 (sd = sqrt(var~_1)): every interior bin is
    # centred on the mean, so P = 2 Phi(h / sd) - 1 per channel
    sharp = torch.cat([noise, torch.full_like(noise, -1.0)], 1)
    x0c = x0.clamp(-0.99, 0.99)
    xtc = d.q_sample(x0c, t, noise)
    nll = d.training_losses(sharp, x0c, xtc, t, noise)["vb"]
    expected = -math.log2(2 * _approx_cdf(torch.tensor(1 / 255) / var1.sqrt()).item() - 1)
    torch.testing.assert_close(nll, torch.full_like(nll, expected), rtol=1e-6, atol=1e-6)
    assert (nll < vb).all()


def test_mixed_t_branches_selected_per_row():
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    x0, noise, t, out = _setup(M=10)
    t[:5] = 0
    t[5:] = torch.arange(1, 6) * 100
    xt = d.q_sample(x0, t, noise)
    vb = d.training_losses(out, x0, xt, t, noise)["vb"]
    vb0 = d.training_losses(out[:5], x0[:5], xt[:5], t[:5], noise[:5])["vb"]
    vb1 = d.training_losses(out[5:], x0[5:], xt[5:], t[5:], noise[5:])["vb"]
    torch.testing.assert_close(vb, torch.cat([vb0, vb1]))


def test_output_channel_check():
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    x0, noise, t, out = _setup()
    with pytest.raises(ValueError):
        d.training_losses(out[:, :3], x0, x0, t, noise)


# ----------------------------------------------------------------------------- loss precision
def _vb_as_composed(d, out, x0, xt, t):
    """vb_terms_bpd written out from the module's own pieces in the inputs' dtype (its code
    before the float32 floor): fp32 and fp64 inputs must still give exactly this."""
    from ivfast.models.diffusion import discretized_gaussian_log_likelihood, normal_kl

    true_mean, _, true_log_var = d.q_posterior_mean_variance(x0, xt, t)
    mean, log_var, _ = d.p_mean_variance(out, xt, t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_and_fp64_losses_unchanged(dtype):
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    x0, noise, t, out = _setup(M=24, dtype=dtype)
    t[:3] = 0
    xt = d.q_sample(x0, t, noise)
    C = x0.shape[1]
    losses = d.training_losses(out, x0, xt, t, noise)
    assert all(v.dtype == dtype for v in losses.values())
    assert torch.equal(losses["vb"], _vb_as_composed(d, out, x0, xt, t))
    assert torch.equal(losses["mse"], ((out[:, :C] - noise) ** 2).mean(1))
    if dtype == torch.float32:  # autocast (as in a bf16 autocast region) changes nothing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = d.training_losses(out, x0, xt, t, noise)
        for k in losses:
            assert auto[k].dtype == dtype and torch.equal(auto[k], losses[k]), k


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16+autocast"])
def test_bf16_losses_computed_in_fp32(autocast):
    """bf16 inputs: every step of the losses in float32; the result is exactly the float32
    computation of the same (upcast) inputs, returned in float32, and the gradient reaches the
    bf16 output in bf16."""
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    x0, noise, t, out = _setup(M=64, dtype=torch.float32)
    t[:4] = 0
    xt = d.q_sample(x0, t, noise)
    b = [x.bfloat16() for x in (out, x0, xt, noise)]
    out_b = b[0].requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = d.training_losses(out_b, b[1], b[2], t, b[3])
    ref = d.training_losses(out_b.detach().float(), b[1].float(), b[2].float(), t, b[3].float())
    for k in ("mse", "vb", "loss"):
        assert losses[k].dtype == torch.float32 and torch.equal(losses[k], ref[k]), k
    losses["vb"].mean().backward()
    assert out_b.grad.dtype == torch.bfloat16 and out_b.grad[:, 6:].abs().sum() > 0
    # in bf16 throughout (the old arithmetic) the term is far off: what the float32 floor fixes
    old = _vb_as_composed(d, out_b.detach(), b[1], b[2], t)
    assert old.dtype == torch.bfloat16
    assert ((old.double() - ref["vb"].double()).abs() / ref["vb"].double()).median() > 1e-2
