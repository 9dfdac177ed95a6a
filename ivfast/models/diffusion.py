"""Gaussian diffusion (DDPM) maths for the per-token diffusion reconstruction head.

Only what training needs: noise schedules, the forward
process ``q(x_t | x_0)``, the true posterior ``q(x_{t-1} | x_t, x_0)``, the model's
reverse Gaussian ``p(x_{t-1} | x_t)`` under the epsilon parameterisation, and the
per-sample training losses.

Notation: ``T`` steps, ``beta_t`` the per-step noise variances, ``alpha_t = 1 - beta_t``,
``abar_t = prod_{s <= t} alpha_s`` (``abar_{-1} = 1``).

Losses (per sample, averaged over every non-batch dim, called "channels" below):

- ``mse``: mean (eps_hat - eps)^2.
- ``vb`` (only when the model also predicts its variance, i.e. ``learn_sigma``): the
  variational-bound term, in bits per dim, evaluated with the model's mean computed from a
  *detached* eps_hat, so its gradient only reaches the variance channels. The variance is
  the "learned range" form ``log var = f log beta_t + (1 - f) log var~_t``, ``f = (v+1)/2``,
  where ``var~_t`` is the posterior variance (its t = 0 entry replaced by the t = 1 one).
  For t > 0 the term is KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2; for t = 0 it is the
  negative log-likelihood of x_0 under a Gaussian discretised into 255 bins of width 2/255
  on [-1, 1] (edge bins below -0.999 / above 0.999 extend to -inf / +inf), divided by ln 2.
  The normal CDF in that likelihood uses the tanh approximation
  ``Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

Schedule tables are computed in float64 (numpy), kept as float64 torch tensors on the CPU,
and copied once per device on first use; lookups are cast to the dtype of the tensor they
are broadcast against.

Precision: the losses (``vb_terms_bpd`` and ``training_losses``) compute in float32 at least,
whatever their inputs' dtype and under autocast too: bfloat16 / float16 inputs are upcast
(float64 ones stay float64), autocast is off inside, and the per-sample losses come back in
that dtype (float32 for bf16 inputs). Their gradients reach the inputs in the inputs' dtype.
The reason is the variational bound: its KL is a small difference of O(1) terms
(``logvar2 - logvar1 - 1 + exp(logvar1 - logvar2)`` vanishes to second order as the two
variances meet), built from log-variances of about -2 to -12 (``log beta_t``, ``log var~_t``
and their learned-range interpolation) that bfloat16's 8-bit mantissa rounds by up to 2^-5
absolute before ``exp``. In bfloat16 each sample's term came out ~10% off (median), its mean
14-30% high, and its gradient on the head's condition at cosine 0.6-0.83 to float32's
(measured at the Stage-1 head's size).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import torch

from ivfast.ops.dispatch import autocast_off

SCHEDULES = ("cosine", "linear")

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------- schedules
def cosine_alpha_bar(s: np.ndarray | float) -> np.ndarray:
    """abar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2) for s = t / T in [0, 1]."""
    s = np.asarray(s, dtype=np.float64)
    return np.cos((s + 0.008) / 1.008 * (math.pi / 2.0)) ** 2


def make_betas(schedule: str, num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Per-step betas (float64, length ``num_timesteps``) for a named schedule."""
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "cosine":
        grid = np.arange(T + 1, dtype=np.float64) / T
        ab = cosine_alpha_bar(grid)
        betas = np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)
    elif schedule == "linear":
        # DDPM's 1e-4 .. 0.02 over 1000 steps, stretched so other T keep the same total noise.
        scale = 1000.0 / T
        betas = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return betas.astype(np.float64)


# --------------------------------------------------------------------------- densities
def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor,
              mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ) in nats.

    KL = 0.5 * (logvar2 - logvar1 + (e^logvar1 + (mean1 - mean2)^2) / e^logvar2 - 1).
    """
    return 0.5 * (logvar2 - logvar1 - 1.0
                  + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~= 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor,
                                        bin_halfwidth: float = 1.0 / 255.0,
                                        edge: float = 0.999,
                                        min_prob: float = 1e-12) -> torch.Tensor:
    """Elementwise log P(bin containing x) under N(means, exp(log_scales)^2).

    Bins have width ``2 * bin_halfwidth`` centred on x; values below ``-edge`` own the whole
    lower tail, values above ``edge`` the whole upper tail. Probabilities are floored at
    ``min_prob`` before the log.
    """
    inv_std = torch.exp(-log_scales)
    centred = x - means
    cdf_hi = approx_standard_normal_cdf(inv_std * (centred + bin_halfwidth))
    cdf_lo = approx_standard_normal_cdf(inv_std * (centred - bin_halfwidth))
    log_lower_tail = torch.log(cdf_hi.clamp(min=min_prob))
    log_upper_tail = torch.log((1.0 - cdf_lo).clamp(min=min_prob))
    log_bin = torch.log((cdf_hi - cdf_lo).clamp(min=min_prob))
    return torch.where(x < -edge, log_lower_tail,
                       torch.where(x > edge, log_upper_tail, log_bin))


def _mean_nonbatch(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first: (M, ...) -> (M,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def loss_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype the losses compute in: the inputs' promoted dtype, float32 at least."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# --------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """Schedules and training maths of a discrete-time Gaussian diffusion.

    Args:
        num_timesteps: T.
        schedule: ``"cosine"`` or ``"linear"``.
        learn_sigma: the model outputs 2C channels (eps, v) instead of C (eps); adds ``vb``.
    """

    _TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
               "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
               "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance",
               "posterior_log_variance_clipped", "posterior_mean_coef1",
               "posterior_mean_coef2", "log_betas")

    def __init__(self, num_timesteps: int = 1000, schedule: str = "cosine",
                 learn_sigma: bool = False):
        self.num_timesteps = int(num_timesteps)
        self.schedule = schedule
        self.learn_sigma = bool(learn_sigma)

        betas = make_betas(schedule, self.num_timesteps)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        ac_next = np.append(ac[1:], 0.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # var~_0 = 0; keep a finite log by borrowing var~_1 (T == 1 has nothing to borrow).
        post_var_for_log = np.append(post_var[1], post_var[1:]) if len(post_var) > 1 \
            else np.maximum(post_var, betas)
        tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": ac_next,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(post_var_for_log),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
        }
        for name, arr in tables.items():
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)))
        self._device_tables: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ lookups
    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """A schedule table (float64) on ``device``, copied there once and cached."""
        arr = getattr(self, name)
        if arr.device == device:
            return arr
        key = (name, device)
        cached = self._device_tables.get(key)
        if cached is None:
            cached = arr.to(device)
            self._device_tables[key] = cached
        return cached

    def extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] cast to ``like.dtype`` and shaped (t.shape + 1s) to broadcast with ``like``.

        ``t`` is an integer tensor whose shape is a prefix of ``like.shape`` (usually (M,)).
        """
        if t.dim() > like.dim() or tuple(like.shape[: t.dim()]) != tuple(t.shape):
            raise ValueError(f"t shape {tuple(t.shape)} does not lead x shape {tuple(like.shape)}")
        table = self.table(name, like.device)
        vals = table[t.to(device=like.device, dtype=torch.long)].to(like.dtype)
        return vals.reshape(tuple(t.shape) + (1,) * (like.dim() - t.dim()))

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x shape {tuple(x_start.shape)}")
        return (self.extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.extract("posterior_mean_coef1", t, x_t) * x_start
                + self.extract("posterior_mean_coef2", t, x_t) * x_t)
        var = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    # ------------------------------------------------------------------ reverse process
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor,
                                eps: torch.Tensor) -> torch.Tensor:
        """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def split_output(self, model_output: torch.Tensor, x: torch.Tensor):
        """(eps_hat, v or None) from a model output with C or 2C channels (dim 1)."""
        C = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learn_sigma needs {2 * C} output channels, "
                                 f"got {model_output.shape[1]}")
            return model_output[:, :C], model_output[:, C:]
        if model_output.shape[1] != C:
            raise ValueError(f"expected {C} output channels, got {model_output.shape[1]}")
        return model_output, None

    def model_log_variance(self, v: torch.Tensor | None, t: torch.Tensor,
                           like: torch.Tensor) -> torch.Tensor:
        """Log-variance of p(x_{t-1} | x_t).

        Learned range: ``f log beta_t + (1 - f) log var~_t`` with f = (v + 1) / 2; without a
        learned variance, the fixed "large" choice (log beta_t, with beta_0 replaced by var~_1
        as in the clipped posterior table).
        """
        min_log = self.extract("posterior_log_variance_clipped", t, like)
        max_log = self.extract("log_betas", t, like)
        if v is None:
            # fixed large variance: [var~_1, beta_1, ..., beta_{T-1}]
            first = (t.reshape(t.shape + (1,) * (like.dim() - t.dim())) == 0)
            return torch.where(first, min_log, max_log).expand_as(like)
        frac = (v + 1.0) * 0.5
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, log-variance and predicted x_0 of the model's p(x_{t-1} | x_t)."""
        eps, v = self.split_output(model_output, x_t)
        log_var = self.model_log_variance(v, t, x_t)
        pred_x0 = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return mean, log_var, pred_x0

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor,
                     x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample variational-bound term in bits/dim: KL for t > 0, decoder NLL at t = 0.

        Every step (posterior mean and log-variance, the model's mean from eps_hat, the
        learned-range log-variance, the KL / discretised log-likelihood and their means) runs
        in :func:`loss_dtype` (float32 for bf16 inputs, autocast off): in bfloat16 the
        log-variance differences and their exponentials lose most of their digits (see the
        module docstring). Returns (M,) in that dtype; gradients reach ``model_output`` in its
        own dtype.
        """
        dtype = loss_dtype(model_output, x_start, x_t)
        with autocast_off(model_output.device):
            model_output, x_start, x_t = (x.to(dtype) for x in (model_output, x_start, x_t))
            true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
            mean, log_var, _ = self.p_mean_variance(model_output, x_t, t)
            kl = _mean_nonbatch(normal_kl(true_mean, true_log_var, mean, log_var)) / _LN2
            nll = -_mean_nonbatch(discretized_gaussian_log_likelihood(
                x_start, mean, 0.5 * log_var)) / _LN2
            return torch.where(t.reshape(-1) == 0, nll, kl)

    def training_losses(self, model_output: torch.Tensor, x_start: torch.Tensor,
                        x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample losses (shape (M,)) for an eps-prediction model.

        ``model_output`` is the net's output at (x_t, t): eps_hat (C channels) or
        [eps_hat, v] (2C channels) when ``learn_sigma``. Returns ``mse``, ``loss`` and, with
        ``learn_sigma``, ``vb`` (gradient only through v; eps_hat is detached there). The losses
        are computed and returned in :func:`loss_dtype` (float32 for bf16 inputs).
        """
        if t.dim() != 1 or t.shape[0] != x_start.shape[0]:
            raise ValueError(f"t must have shape ({x_start.shape[0]},), got {tuple(t.shape)}")
        eps, v = self.split_output(model_output, x_start)
        dtype = loss_dtype(eps, noise)
        with autocast_off(eps.device):
            out = {"mse": _mean_nonbatch((eps.to(dtype) - noise.to(dtype)).pow(2))}
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            out["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            out["loss"] = out["mse"] + out["vb"]
        else:
            out["loss"] = out["mse"]
        return out
