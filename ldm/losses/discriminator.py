"""PatchGAN discriminator (Isola et al., pix2pix) with BatchNorm or ActNorm; CompVis key layout `main.N.*`."""
import torch
import torch.nn as nn


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc), initialised from the first training batch (Glow).

    On its first forward in training mode loc = -mean and scale = 1 / (std + 1e-6) per channel,
    so that batch leaves with zero mean and unit variance. `initialized` is a buffer so loaded
    checkpoints are not re-initialised.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).flatten(1)                      # (C, B*H*W)
        mean = flat.mean(dim=1)[None, :, None, None]             # (1, C, 1, 1)
        std = flat.std(dim=1)[None, :, None, None]               # (1, C, 1, 1)
        self.loc.copy_(-mean)
        self.scale.copy_(1.0 / (std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        return self.scale * (x + self.loc)                       # (B, C, H, W)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs giving one real/fake logit per receptive-field patch.

    input_nc: image channels; ndf: filters of the first conv (doubling per layer, capped at 8x);
    n_layers: stride-2 convs after the first; use_actnorm: ActNorm instead of BatchNorm.
    A 256x256 input gives (B, 1, 30, 30) logits with n_layers=3, a 64x64 input (B, 1, 6, 6).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own shift, so its convs carry no bias
        layers = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last feature conv keeps the resolution (-1 px)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                       norm_layer(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)                                      # (B, C, H, W) -> (B, 1, H', W')


def weights_init(module: nn.Module) -> None:
    """DCGAN init, for `discriminator.apply(weights_init)`: conv weights N(0, 0.02), BatchNorm N(1, 0.02) / 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
