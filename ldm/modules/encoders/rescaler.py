"""SpatialRescaler: resize a spatial condition (image or one-hot segmentation) for `concat` conditioning."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.util import ConfigError

_METHODS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")  # 2-D modes of F.interpolate


class SpatialRescaler(nn.Module):
    """Resize n_stages times by `multiplier`, then an optional 1×1 conv `channel_mapper` to out_channels.

    Integer maps (B, H, W) (e.g. `segmentation`) are one-hot encoded to (B, n_classes, H, W) first,
    so n_classes must be set for them (and in_channels = n_classes when a channel_mapper is used).
    """

    def __init__(self,
                 n_stages: int = 1,             # resize steps
                 method: str = "bilinear",      # F.interpolate mode
                 multiplier: float = 0.5,       # scale factor per step
                 in_channels: int = 3,          # channels entering channel_mapper
                 out_channels: int | None = None,  # None: no channel_mapper
                 bias: bool = False,            # channel_mapper bias
                 n_classes: int | None = None):  # one-hot width for integer segmentation maps
        super().__init__()
        if n_stages < 0:
            raise ConfigError(f"SpatialRescaler.n_stages must be >= 0, got {n_stages}")
        if method not in _METHODS:
            raise ConfigError(f"SpatialRescaler.method must be one of {_METHODS}, got {method!r}")
        if multiplier <= 0:
            raise ConfigError(f"SpatialRescaler.multiplier must be > 0, got {multiplier}")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.in_channels = in_channels
        self.n_classes = n_classes
        if out_channels is not None:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        else:
            self.channel_mapper = None

    def one_hot(self, seg: torch.Tensor) -> torch.Tensor:
        """(B, H, W) integer labels -> (B, n_classes, H, W) float one-hot."""
        if self.n_classes is None:
            raise ConfigError("SpatialRescaler got an integer segmentation map; set n_classes to one-hot encode it")
        if seg.numel() and (seg.min() < 0 or seg.max() >= self.n_classes):
            raise ValueError(f"SpatialRescaler: segmentation labels must lie in [0, {self.n_classes}), "
                             f"got [{int(seg.min())}, {int(seg.max())}]")
        return F.one_hot(seg.long(), self.n_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            if x.ndim != 3:
                raise ValueError(f"SpatialRescaler: integer input must be a segmentation map (B, H, W), "
                                 f"got {tuple(x.shape)}")
            x = self.one_hot(x)                                              # (B, K, H, W)
        if x.ndim != 4:
            raise ValueError(f"SpatialRescaler expects (B, C, H, W) or integer (B, H, W), got {tuple(x.shape)}")
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)  # (B, C, H·m, W·m)
        if self.channel_mapper is not None:
            if x.shape[1] != self.in_channels:
                raise ValueError(f"SpatialRescaler: input has {x.shape[1]} channels, "
                                 f"in_channels={self.in_channels}")
            x = self.channel_mapper(x)                                       # (B, out_channels, h, w)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
