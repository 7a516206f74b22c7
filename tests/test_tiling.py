"""Tiled processing: grid coverage, Gaussian weights, tiled denoiser / decode / encode against untiled, seams."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedules import make_schedule
from ldm.modules.autoencoder.model import Decoder, Encoder
from ldm.superres.tiling import (TiledDenoiser, coverage, gaussian_weights, seam_score, tile_borders, tile_grid,
                                 tile_starts, tiled_decode, tiled_encode)


# ----------------------------------------------------------------------------- grid and weights

def test_tile_starts_follow_stablesr():
    assert tile_starts(64, 64, 32) == [0]
    assert tile_starts(50, 64, 32) == [0]
    assert tile_starts(96, 64, 32) == [0, 32]
    assert tile_starts(100, 64, 32) == [0, 32, 36]          # the last tile snapped to the border
    assert tile_starts(128, 64, 0) == [0, 64]
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_starts(100, 64, 64)


@pytest.mark.parametrize("h,w,tile,overlap", [(37, 101, 16, 5), (64, 64, 64, 32), (20, 130, 32, 8), (7, 9, 16, 4)])
def test_tiles_cover_every_pixel_with_equal_sizes(h, w, tile, overlap):
    grid = tile_grid(h, w, tile, overlap)
    assert (coverage(grid, h, w) > 0).all()
    assert len({(t.height, t.width) for t in grid}) == 1
    assert all(t.top + t.height <= h and t.left + t.width <= w for t in grid)
    weighted = coverage(grid, h, w, lambda a, b: gaussian_weights(a, b))
    assert weighted.min() > 0                                # every pixel gets a positive total weight


def test_gaussian_weights_sigma_and_released_centres():
    w = gaussian_weights(64, 64)
    assert w.shape == (64, 64) and abs(w.max().item() - math.exp(-0.5 ** 2 / (2 * 6.4 ** 2))) < 1e-6  # x peak: 31.5
    row = w[32]                                              # released: y centred on T / 2 = 32 exactly
    assert torch.equal(row, w.max(dim=0).values)
    col = w[:, 0] / w[32, 0]
    for k in (1, 5, 10):                                     # sigma = 0.1 T = 6.4
        assert abs(col[32 + k].item() - math.exp(-k ** 2 / (2 * 6.4 ** 2))) < 1e-6
    assert torch.allclose(w[0], w[0].flip(0))                # x centred on (T - 1) / 2: symmetric
    assert not torch.allclose(w[:, 0], w[:, 0].flip(0))      # y is not (the released quirk)
    s = gaussian_weights(64, 48, centres="symmetric")
    assert torch.allclose(s, s.flip(0)) and torch.allclose(s, s.flip(1))
    assert w[0, 32] / w[32, 32] < 1e-5                       # edge weight about 4e-6 of the centre


# ----------------------------------------------------------------------------- denoiser

class PointwiseModel(nn.Module):
    """out(x)[p] depends on x[p], c_concat[p] (2x finer, pooled), the context and t only: tiling must not change it."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(4 + 2, 4, 1)

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        c = F.avg_pool2d(c_concat[0], 2)                                         # (B, 2, H, W)
        h = self.mix(torch.cat([x, c], 1))
        return h * c_crossattn.mean(dim=(1, 2))[:, None, None, None] + 0.001 * t[:, None, None, None]


class ConvModel(nn.Module):
    """A 3x3 convolution stack (receptive field 7): tiles see different borders."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1),
                                 nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1))

    def forward(self, x, t, c_concat=None):
        return self.net(x + c_concat)


def conditions(b=2, h=24, w=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, h, w, generator=g)
    cond = {"c_concat": [torch.randn(b, 2, 2 * h, 2 * w, generator=g)],
            "c_crossattn": torch.randn(b, 5, 8, generator=g)}
    return x, torch.tensor([10, 500]), cond


@torch.no_grad()
def test_one_tile_equals_the_plain_model():
    torch.manual_seed(0)
    model, (x, t, _) = ConvModel(), conditions()
    c = torch.randn_like(x)
    tiled = TiledDenoiser(model, tile=64, overlap=32)(x, t, c_concat=c)
    torch.testing.assert_close(tiled, model(x, t, c_concat=c), atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("tiles_per_batch", [1, 4])
def test_tiles_crop_conditions_in_place(tiles_per_batch):
    torch.manual_seed(0)
    model, (x, t, cond) = PointwiseModel(), conditions()
    tiled = TiledDenoiser(model, tile=16, overlap=6, tiles_per_batch=tiles_per_batch)(x, t, **cond)
    torch.testing.assert_close(tiled, model(x, t, **cond), atol=1e-5, rtol=0)


@torch.no_grad()
def test_tiled_conv_model_is_close_inside_and_batches_agree():
    torch.manual_seed(0)
    model, (x, t, _) = ConvModel(), conditions(h=32, w=48)
    c = torch.randn_like(x)
    one = TiledDenoiser(model, tile=16, overlap=8)(x, t, c_concat=c)
    four = TiledDenoiser(model, tile=16, overlap=8, tiles_per_batch=4)(x, t, c_concat=c)
    torch.testing.assert_close(one, four, atol=1e-5, rtol=0)
    plain = model(x, t, c_concat=c)
    assert (one - plain).abs().mean() < 0.3 * plain.abs().mean()


def test_bad_condition_size_is_named():
    x, t, _ = conditions()
    with pytest.raises(ValueError, match=r"condition c_concat has spatial size 25x40"):
        TiledDenoiser(ConvModel(), tile=16, overlap=4)(x, t, c_concat=torch.randn(2, 4, 25, 40))


@torch.no_grad()
def test_sampler_runs_through_the_tiled_denoiser():
    torch.manual_seed(0)
    model, (_, _, cond) = PointwiseModel(), conditions(b=2, h=24, w=40)
    schedule = make_schedule("linear", 1000)
    x_T = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))
    plain = sample_ddim(model, x_T, schedule, steps=5, extra_args=cond)
    tiled = sample_ddim(TiledDenoiser(model, tile=16, overlap=8), x_T, schedule, steps=5, extra_args=cond)
    torch.testing.assert_close(tiled, plain, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- first stage

def small_decoder_encoder():
    cfg = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    return Decoder(**cfg).eval(), Encoder(**cfg).eval()


@torch.no_grad()
def test_tiled_decode_and_encode_with_one_tile_equal_untiled():
    dec, enc = small_decoder_encoder()
    z = torch.randn(1, 4, 12, 20)
    torch.testing.assert_close(tiled_decode(dec, z, tile=32, overlap=8), dec(z), atol=1e-5, rtol=0)
    x = torch.randn(1, 3, 24, 40)
    torch.testing.assert_close(tiled_encode(enc, x, tile=64, overlap=16, factor=2), enc(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_tiled_decode_and_encode_of_local_maps_equal_untiled():
    up = lambda z: F.interpolate(z[:, :3] * 2 + 1, scale_factor=4, mode="nearest")  # noqa: E731
    down = lambda x: F.avg_pool2d(x, 4)                                              # noqa: E731
    z, x = torch.randn(2, 4, 20, 36), torch.randn(2, 3, 80, 144)
    torch.testing.assert_close(tiled_decode(up, z, tile=8, overlap=3), up(z), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled_encode(down, x, tile=32, overlap=8, factor=4), down(x), atol=1e-5, rtol=0)
    # structures of outputs, each at its own scale, and extra inputs cropped to the tile
    pyramid = lambda x: (F.avg_pool2d(x, 4), [x, F.avg_pool2d(x, 2)])                # noqa: E731
    out, ref = tiled_encode(pyramid, x, tile=32, overlap=8, factor=4), pyramid(x)
    for a, b in zip([out[0], *out[1]], [ref[0], *ref[1]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    fused = lambda z, feats: up(z) + feats[1]                                        # noqa: E731
    feats = [torch.randn(2, 3, 40, 72), torch.randn(2, 3, 80, 144)]
    torch.testing.assert_close(tiled_decode(fused, z, tile=8, overlap=4, extra=feats), fused(z, feats),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiples of the factor 4"):
        tiled_encode(down, x, tile=30, overlap=8, factor=4)
    with pytest.raises(ValueError, match="not a whole multiple of the tile"):
        tiled_decode(lambda z: F.interpolate(z, size=(5, 7)), z, tile=8, overlap=3)


def tile_normalised_decode(z):
    """A decoder with a per-call statistic, as GroupNorm has: each tile is decoded with its own mean removed."""
    return F.interpolate(z[:, :3] - 0.5 * z[:, :3].mean(dim=(2, 3), keepdim=True), scale_factor=2, mode="bilinear")


@torch.no_grad()
def test_blending_hides_the_seams_of_per_tile_statistics():
    g = torch.Generator().manual_seed(3)
    z = F.interpolate(torch.randn(1, 4, 4, 4, generator=g), size=(24, 24), mode="bicubic")  # a smooth latent
    grid = tile_grid(24, 24, 12, 0)
    naive = torch.zeros(1, 3, 48, 48)
    for tile in grid:                                        # decode each tile alone, paste without blending
        naive[..., tile.top * 2:(tile.top + 12) * 2, tile.left * 2:(tile.left + 12) * 2] = \
            tile_normalised_decode(tile.crop(z))
    ys, xs = tile_borders(grid, 24, 24, factor=2)
    blended = tiled_decode(tile_normalised_decode, z, tile=12, overlap=6)
    assert seam_score(naive, ys, xs) > 3
    assert seam_score(blended, ys, xs) < 1.5
    assert abs(seam_score(tile_normalised_decode(z), ys, xs) - 1) < 0.2


# ----------------------------------------------------------------------------- seam measure

def test_seam_score_on_a_synthetic_seam():
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = 0.3 * (torch.sin(6 * x) + torch.cos(5 * y))[None, None].repeat(1, 3, 1, 1)
    assert abs(seam_score(smooth, [32], [32]) - 1) < 0.05
    seam = smooth.clone()
    seam[..., :, 32:] += 0.2                                  # a step between columns 31 and 32
    seam[..., 40:, :] -= 0.2                                  # and between rows 39 and 40
    assert seam_score(seam, [40], [32]) > 4
    assert abs(seam_score(seam, [20], [16]) - 1) < 0.05       # measured away from the steps: no seam
    grid = tile_grid(64, 64, 40, 8)
    assert tile_borders(grid, 64, 64) == ([24, 40], [24, 40])
    with pytest.raises(ValueError, match="no borders"):
        seam_score(smooth, [], [])
