"""The training objective: DDPM with 1000 steps and linear betas, as PixArt-α (and DiT).

Default: epsilon prediction with learned variance (8 output channels for 4 latent channels),
trained with IDDPM's hybrid loss, MSE on epsilon plus the variational bound for the
variance with the mean frozen. It is the paper's setting, and it keeps our models
interchangeable with released PixArt checkpoints and with diffusers' PixArtAlphaPipeline,
which drops the variance half at sampling time. `learned_sigma=False` trains plain epsilon.
`snr_gamma` weights the epsilon MSE by Min-SNR-γ (Hang et al., 2023): min(SNR, γ) / SNR, so
the nearly clean timesteps, whose fine detail dominates the uniform average, stop
outweighing the noisy ones, where layout and colours are decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _normal_kl(mean1, logvar1, mean2, logvar2):  # noqa: ANN001, ANN202
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):  # noqa: ANN001, ANN202
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):  # noqa: ANN001, ANN202
    """Log-likelihood of data discretised to 256 bins in [-1, 1] (IDDPM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


@dataclass
class Diffusion:
    num_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    learned_sigma: bool = True
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.betas = betas
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt()
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)
        # the first posterior variance is 0: IDDPM clips the log to the second value
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    def output_channels(self, latent_channels: int) -> int:
        return latent_channels * (2 if self.learned_sigma else 1)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].float().view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:  # noqa: ANN001
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-batch loss and its parts. `model_output` has the model's channels (eps, or
        eps and the variance interpolation v in [-1, 1])."""
        model_output = model_output.float()
        channels = x0.shape[1]
        eps = model_output[:, :channels]
        mse = _per_sample_mean((eps - noise) ** 2)
        if self.snr_gamma is not None:
            snr = self.snr.to(t.device)[t].float()
            mse = mse * torch.clamp(snr, max=self.snr_gamma) / snr
        if not self.learned_sigma:
            return mse.mean(), {"mse": mse.mean().item()}
        vb = self._vb(eps.detach(), model_output[:, channels:], x0, x_t, t)
        return (mse + vb).mean(), {"mse": mse.mean().item(), "vb": vb.mean().item()}

    def _vb(self, eps, v, x0, x_t, t):  # noqa: ANN001, ANN202
        """The variational bound term, in bits per dimension, training only the variance:
        the mean comes from the frozen epsilon so this term does not pull on it."""
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(torch.log(self.betas), t, x_t)
        frac = (v + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        coef1, coef2 = self._at(self.posterior_mean_coef1, t, x_t), self._at(self.posterior_mean_coef2, t, x_t)
        model_mean = coef1 * pred_x0 + coef2 * x_t
        true_mean = coef1 * x0 + coef2 * x_t
        true_log_variance = self._at(self.posterior_log_variance_clipped, t, x_t)
        kl = _per_sample_mean(_normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
        nll = -_per_sample_mean(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)
