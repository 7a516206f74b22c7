"""Colour correction: AdaIN and wavelet closed forms."""
import pytest
import torch

from ldm.superres.colorfix import (adain_color_fix, channel_stats, colorfix, wavelet_blur, wavelet_color_fix,
                                   wavelet_decompose)


def images(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    smooth = torch.stack([0.5 * x, 0.4 * y, 0.3 * x * y])[None].repeat(2, 1, 1, 1)
    return smooth + 0.2 * torch.rand(2, 3, size, size, generator=g) - 0.1   # (2, 3, size, size)


def test_adain_gives_exactly_the_lr_statistics():
    sr, lr = images(0), 0.5 * images(1) + torch.tensor([0.2, -0.1, 0.3])[:, None, None]
    out = adain_color_fix(sr, lr, eps=0.0)
    mu_o, sd_o = channel_stats(out, 0.0)
    mu_l, sd_l = channel_stats(lr, 0.0)
    torch.testing.assert_close(mu_o, mu_l, atol=1e-6, rtol=0)
    torch.testing.assert_close(sd_o, sd_l, atol=1e-6, rtol=1e-5)
    # an affine colour change per channel is undone exactly
    shifted = lr * torch.tensor([1.5, 0.7, 1.1])[:, None, None] + torch.tensor([0.3, -0.2, 0.05])[:, None, None]
    torch.testing.assert_close(adain_color_fix(shifted, lr, eps=0.0), lr, atol=1e-5, rtol=0)


def test_adain_upsamples_the_lr_and_keeps_sr_structure():
    sr = images(0, 64)
    lr = images(1, 16)
    out = colorfix(sr, lr, "adain")
    assert out.shape == sr.shape
    # per channel, out is an increasing affine map of sr: the correlation is 1
    a, b = out[0, 0].flatten(), sr[0, 0].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99999


def test_wavelet_decomposition_sums_back_exactly():
    x = images(2)
    high, low = wavelet_decompose(x)
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)
    assert low.std() < x.std()                             # the low band is smooth
    flat = torch.full((1, 3, 8, 8), 0.3)                   # dilation 16 > image side: replicate padding still works
    torch.testing.assert_close(wavelet_blur(flat, 16), flat)


def test_wavelet_fix_takes_the_lr_low_band_and_removes_a_colour_shift():
    sr, lr = 0.8 * images(0) + torch.tensor([0.2, 0.0, -0.1])[:, None, None], images(1)   # SR with a colour cast
    out = wavelet_color_fix(sr, lr)
    high_sr, _ = wavelet_decompose(sr)
    _, low_lr = wavelet_decompose(lr)
    torch.testing.assert_close(out, high_sr + low_lr)
    _, low_out = wavelet_decompose(out)
    _, low_sr = wavelet_decompose(sr)
    # the output's low band is the LR's up to the (small) low band of the SR's detail
    assert (low_out - low_lr).abs().mean() < 0.1 * (low_sr - low_lr).abs().mean()
    shift = torch.tensor([0.25, -0.3, 0.1])[:, None, None]
    torch.testing.assert_close(wavelet_color_fix(lr + shift, lr), lr, atol=1e-5, rtol=0)


def test_colorfix_modes_and_errors():
    sr, lr = images(0), images(1)
    assert colorfix(sr, lr, "none") is sr
    torch.testing.assert_close(colorfix(sr[0], lr[0], "wavelet"), wavelet_color_fix(sr, lr)[0])
    with pytest.raises(ValueError, match="mode must be one of adain, wavelet, none"):
        colorfix(sr, lr, "hist")
    with pytest.raises(ValueError, match="differ in batch or channels"):
        colorfix(sr, torch.rand(2, 4, 32, 32))
