"""Gaussian mixtures with their exact denoiser, the oracle of the sampler tests.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I); at noise level sigma, x = x0 + sigma z has the posterior mean
    E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I).
`discrete_model` turns it into a discrete-time network of any parameterisation on a DiffusionSchedule.
"""
import torch

F64 = torch.float64


class Mixture:
    """D(x, sigma) = E[x0 | x] for isotropic components; x (N, D), sigma (N,)."""

    def __init__(self, weights, means, stds):
        self.w = torch.tensor(weights, dtype=F64)                       # (K,)
        self.mu = torch.tensor(means, dtype=F64)                        # (K, D)
        self.s = torch.tensor(stds, dtype=F64)                          # (K,)

    def __call__(self, x, sigma):
        var = self.s ** 2 + sigma.view(-1, 1).to(F64) ** 2             # (N, K)
        d2 = ((x[:, None, :].to(F64) - self.mu[None]) ** 2).sum(-1)     # (N, K)
        logp = self.w.log() - 0.5 * d2 / var - 0.5 * x.shape[1] * var.log()
        r = torch.softmax(logp, dim=-1)[..., None]                      # (N, K, 1)
        per_component = self.mu[None] + (self.s ** 2 / var)[..., None] * (x[:, None, :] - self.mu[None])
        return (r * per_component).sum(1).to(x.dtype)                   # (N, D)

    def sample(self, n, generator):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.mu.shape[1], generator=generator, dtype=F64)
        return self.mu[k] + self.s[k, None] * z

    @property
    def mean(self):
        return (self.w[:, None] * self.mu).sum(0)

    @property
    def variance(self):
        """Per-dimension variance of the data."""
        second = (self.w[:, None] * (self.mu ** 2 + self.s[:, None] ** 2)).sum(0)
        return second - self.mean ** 2


def discrete_model(mixture, schedule, parameterization="eps"):
    """The exact discrete-time network model(x_t, t) on `schedule`: t may be fractional (log sigma interpolated)."""
    acp = schedule.alphas_cumprod.to(F64)
    log_sigmas = 0.5 * (torch.log1p(-acp) - acp.log())

    def model(x_t, t):
        t = t.to(F64).clamp(0, len(acp) - 1)
        low = t.floor().long().clamp(max=len(acp) - 2)
        sigma = ((1 - (t - low)) * log_sigmas[low] + (t - low) * log_sigmas[low + 1]).exp()   # (N,)
        s = sigma.view(-1, 1)
        a, b = 1 / (s ** 2 + 1).sqrt(), s / (s ** 2 + 1).sqrt()
        x = x_t.to(F64) / a
        x0 = mixture(x, sigma)
        eps = (x - x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[parameterization]
        return out.to(x_t.dtype)
    return model
