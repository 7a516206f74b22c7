"""Diagonal Gaussian posterior q(z|x) of the KL autoencoder."""
import math

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from `parameters` = concat(mean, logvar) along dim 1.

    logvar is clamped to [-30, 20]. deterministic=True makes it a point mass at the mean
    (zero variance, zero KL). KL and NLL are summed over all non-batch dimensions: shape (B,).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.dim() < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(f"DiagonalGaussianDistribution: parameters must have an even number of channels "
                             f"(mean and logvar) on dim 1, got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)     # (B, C, H, W) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)
        self._dims = tuple(range(1, self.mean.dim()))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps, eps ~ N(0, I) (differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps                          # (B, C, H, W)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other), other defaulting to N(0, I); shape (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=self._dims)
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=self._dims)

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample); shape (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var,
                               dim=self._dims)
