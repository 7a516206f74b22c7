"""Real-ESRGAN degradations: blur kernels (closed forms), each operation's effect, the seeded pipeline, the wrapper."""
import math

import pytest
import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel2d

from ldm.data.blur_kernels import (KERNEL_TYPES, gaussian_kernel, generalized_gaussian_kernel, identity_kernel,
                                   mixed_kernel, pad_kernel, plateau_kernel, random_blur_kernel, random_sinc_kernel,
                                   sinc_kernel)
from ldm.data.degradations import (DegradationConfig, add_gaussian_noise, add_poisson_noise, blur, degrade, jpeg,
                                   resize, usm_sharpen)
from ldm.data.degraded import DegradedSuperResolution
from ldm.util import instantiate_from_config


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textured(size: int = 64, seed: int = 0) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: smooth colour ramps plus fine texture, like a small photo."""
    g = gen(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.3 * torch.sin(6 * x * y)])
    return (base + 0.08 * torch.rand(3, size, size, generator=g))[None].clamp(0, 1)


def mean_abs_gradient(img: torch.Tensor) -> float:
    return float((img[..., 1:] - img[..., :-1]).abs().mean() + (img[..., 1:, :] - img[..., :-1, :]).abs().mean())


# ----------------------------------------------------------------------------- kernels

def test_isotropic_gaussian_matches_kornia_and_all_kernels_normalise():
    ours = gaussian_kernel(11, 1.3)
    ref = get_gaussian_kernel2d((11, 11), (1.3, 1.3))[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for k in (gaussian_kernel(9, 0.5, 2.0, 0.3), generalized_gaussian_kernel(9, 1, 2, 0.3, 0.6),
              plateau_kernel(9, 1, 2, 0.3, 1.2), sinc_kernel(13, math.pi / 4)):
        assert k.shape == (9, 9) or k.shape == (13, 13)
        assert abs(k.sum().item() - 1) < 1e-5


def test_anisotropic_gaussian_rotates_with_theta():
    a = gaussian_kernel(15, 0.8, 2.5, math.pi / 2)
    b = gaussian_kernel(15, 2.5, 0.8, 0.0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    wide_x = gaussian_kernel(15, 2.5, 0.8, 0.0)
    assert wide_x[7, 7 + 3] > wide_x[7 + 3, 7]          # spread along columns (x), not rows


def test_generalized_gaussian_and_plateau_shapes():
    torch.testing.assert_close(generalized_gaussian_kernel(11, 1.5, beta=1.0), gaussian_kernel(11, 1.5))
    heavy, flat = generalized_gaussian_kernel(11, 1.5, beta=0.5), generalized_gaussian_kernel(11, 1.5, beta=2.0)
    # beta < 1 puts more mass far from the centre, beta > 1 less
    ring = lambda k: k[5, 10].item()  # noqa: E731
    assert ring(heavy) > ring(gaussian_kernel(11, 1.5)) > ring(flat)
    plateau = plateau_kernel(11, 1.5, beta=1.0)
    assert ring(plateau) > ring(gaussian_kernel(11, 1.5))  # polynomial tail


def test_sinc_kernel_closed_form_and_ringing():
    omega, k = math.pi / 3, sinc_kernel(21, math.pi / 3)
    c = 10
    for r in (1, 2, 5):  # k(r) / k(0) = 2 J1(omega r) / (omega r)
        ratio = k[c, c + r] / k[c, c]
        expected = 2 * torch.special.bessel_j1(torch.tensor(omega * r, dtype=torch.float64)) / (omega * r)
        assert abs(ratio.item() - expected.item()) < 1e-5
    assert (k < 0).any()                                # negative lobes: overshoot / ringing
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    with pytest.raises(ValueError, match="omega_c"):
        sinc_kernel(7, 4.0)


def test_random_kernels_are_padded_and_seeded():
    args = (KERNEL_TYPES, (0.45, 0.25, 0.12, 0.03, 0.12, 0.03), (0.2, 1.5), (0.5, 2), (1, 1.5), 0.1)
    a, b, c = random_blur_kernel(gen(1), *args), random_blur_kernel(gen(1), *args), random_blur_kernel(gen(2), *args)
    assert a.shape == (21, 21) and abs(a.sum() - 1) < 1e-5
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random_sinc_kernel(gen(0)).shape == (21, 21)
    assert pad_kernel(torch.ones(3, 3)).shape == (21, 21)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_kernel(torch.ones(4, 4))
    with pytest.raises(ValueError, match="unknown blur kernel type 'box'"):
        mixed_kernel(gen(0), 7, ["box"], [1.0], (1, 2), (0.5, 2), (1, 2))


# ----------------------------------------------------------------------------- operations

def test_blur_keeps_constants_reproduces_impulses_and_removes_detail():
    k = gaussian_kernel(9, 0.7, 1.9, 0.4)
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(blur(flat, k), flat)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    torch.testing.assert_close(blur(impulse, k)[0, 0, 3:12, 3:12], k.flip(0).flip(1))
    img = textured()
    torch.testing.assert_close(blur(img, identity_kernel()), img)
    assert mean_abs_gradient(blur(img, gaussian_kernel(21, 2.0))) < 0.5 * mean_abs_gradient(img)
    tiny = torch.rand(1, 3, 4, 4)                         # smaller than the kernel radius: replicate padding
    assert blur(tiny, gaussian_kernel(21, 2.0)).shape == tiny.shape


def test_resize_sizes_and_modes():
    img = torch.rand(2, 3, 20, 30)
    for mode in ("area", "bilinear", "bicubic"):
        assert resize(img, (7, 11), mode).shape == (2, 3, 7, 11)
    with pytest.raises(ValueError, match="resize mode"):
        resize(img, (7, 11), "nearest")


def test_gaussian_noise_has_the_requested_std_and_grey_noise_is_shared():
    img = torch.full((2, 3, 96, 96), 0.5)
    out = add_gaussian_noise(img, [10 / 255, 20 / 255], [False, True], gen(0))
    noise = out - img
    assert abs(noise[0].std().item() * 255 - 10) < 0.5 and abs(noise[1].std().item() * 255 - 20) < 1.0
    assert abs(noise.mean().item()) < 1e-3
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 0], noise[1, 2])
    assert not torch.equal(noise[0, 0], noise[0, 1])
    assert torch.equal(out, add_gaussian_noise(img, [10 / 255, 20 / 255], [False, True], gen(0)))
    assert add_gaussian_noise(torch.ones(1, 3, 8, 8), 0.5, generator=gen(0)).max() <= 1.0


def test_poisson_noise_variance_grows_with_intensity():
    g = gen(3)
    jitter = torch.randint(-40, 41, (1, 3, 128, 128), generator=g)      # 81 levels: L = 2^ceil(log2 81) = 128
    dark, bright = (51 + jitter) / 255.0, (179 + jitter) / 255.0
    nd = add_poisson_noise(dark, 1.0, False, gen(0)) - dark
    nb = add_poisson_noise(bright, 1.0, False, gen(0)) - bright
    ratio = nb.var() / nd.var()
    assert 3.0 < ratio < 4.0, ratio                        # Poisson: var = x / L, i.e. 0.7 / 0.2 = 3.5
    assert abs(nd.var().item() - 0.2 / 128) < 0.1 * 0.2 / 128
    grey = add_poisson_noise(bright, 1.0, True, gen(0)) - bright
    same = ((grey[:, 0] - grey[:, 1]).abs() < 1e-6).float().mean()
    assert same > 0.99                                     # one luminance noise map (except where clamped)


def test_jpeg_is_lossy_more_so_at_low_quality_with_8x8_blocks():
    img = textured(64)
    q95, q10 = jpeg(img, 95), jpeg(img, 10)
    assert q95.shape == img.shape and torch.equal(q95, (q95 * 255).round() / 255)
    err95, err10 = (q95 - img).abs().mean(), (q10 - img).abs().mean()
    assert 0 < err95 < err10
    d = (q10[..., 1:] - q10[..., :-1]).abs().mean(dim=(0, 1, 2))     # (W - 1,) column jumps
    border = d[7::8].mean()                                          # between columns 8k-1 and 8k
    inside = torch.cat([d[i::8] for i in range(7)]).mean()
    assert border > 1.5 * inside
    assert torch.equal(jpeg(img, [95]), q95)
    with pytest.raises(ValueError, match=r"quality must lie in \[1, 100\]"):
        jpeg(img, 0)


def test_usm_sharpen_steepens_edges_and_keeps_flat_regions():
    img = torch.full((1, 3, 64, 64), 0.3)
    img[..., 32:] = 0.7
    out = usm_sharpen(img)
    assert out[0, 0, 10, 28] < 0.3 and out[0, 0, 10, 36] > 0.7   # undershoot / overshoot beside the edge
    torch.testing.assert_close(out[..., :4], img[..., :4], atol=1e-3, rtol=0)
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(usm_sharpen(flat), flat)


# ----------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_degrade_sizes_range_and_seed(scale):
    hr = torch.cat([textured(48, 0), textured(48, 1)])
    a, b = degrade(hr, scale, generator=gen(7)), degrade(hr, scale, generator=gen(7))
    assert a.shape == (2, 3, 48 // scale, 48 // scale)
    assert torch.equal(a, b)
    assert not torch.equal(a, degrade(hr, scale, generator=gen(8)))
    assert 0 <= a.min() and a.max() <= 1 and torch.equal(a, (a * 255).round() / 255)


def test_degrade_differs_from_bicubic_and_presets_differ():
    hr = textured(64)
    clean = F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True)
    errs = {p: (degrade(hr, 4, p, gen(s)) - clean).abs().mean().item() for p in ("stablesr", "realesrgan")
            for s in range(6)}
    assert min(errs.values()) > 0.002
    strong = DegradationConfig.from_any({"preset": "realesrgan", "noise_range": [40, 50], "gaussian_noise_prob": 1,
                                         "noise_range2": [40, 50], "gaussian_noise_prob2": 1})
    mild = DegradationConfig.from_any({"noise_range": [1, 1], "gaussian_noise_prob": 1,
                                       "noise_range2": [1, 1], "gaussian_noise_prob2": 1})
    assert strong.jpeg_range == (30.0, 95.0) and mild.jpeg_range == (60.0, 95.0)
    noisy = [mean_abs_gradient(degrade(hr, 2, c, gen(0))) for c in (mild, strong)]
    assert noisy[1] > noisy[0]


def test_degradation_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown degradation keys"):
        DegradationConfig.from_any({"jpeg_rnage": [30, 95]})
    with pytest.raises(ValueError, match="unknown degradation preset"):
        DegradationConfig.from_any("bsrgan")
    with pytest.raises(ValueError, match="noise_range"):
        DegradationConfig(noise_range=(5, 1))
    with pytest.raises(ValueError, match="jpeg_range2"):
        DegradationConfig(jpeg_range2=(0, 95))
    with pytest.raises(ValueError, match="resize_range"):
        DegradationConfig(resize_range=(1.2, 1.5))
    with pytest.raises(ValueError, match="kernel_prob"):
        DegradationConfig(kernel_prob=(1.0,))
    with pytest.raises(ValueError, match="not divisible by scale 3"):
        degrade(torch.rand(1, 3, 32, 32), 3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(3, 32, 32), 2)


# ----------------------------------------------------------------------------- dataset wrapper

class HRList(torch.utils.data.Dataset):
    def __init__(self, n: int = 4, size: int = 48):
        self.items = [textured(size, i)[0] * 2 - 1 for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"image": self.items[i], "caption": f"picture {i}"}


def test_degraded_super_resolution_samples():
    ds = DegradedSuperResolution(HRList(), scale=4, upsampled_key="lr_up", fixed=True)
    s = ds[1]
    assert s["caption"] == "picture 1" and torch.equal(s["image"], HRList()[1]["image"])
    assert s["lr_image"].shape == (3, 12, 12) and s["lr_up"].shape == (3, 48, 48)
    assert -1 <= s["lr_image"].min() and s["lr_image"].max() <= 1
    again = DegradedSuperResolution(HRList(), scale=4, upsampled_key="lr_up", fixed=True)
    assert torch.equal(s["lr_image"], again[1]["lr_image"])
    assert not torch.equal(ds[1]["lr_image"], DegradedSuperResolution(HRList(), 4, seed=1, fixed=True)[1]["lr_image"])


def test_degraded_super_resolution_random_calls_follow_torch_seed():
    ds = DegradedSuperResolution(HRList(), scale=2)
    torch.manual_seed(0)
    a, b = ds[0]["lr_image"], ds[0]["lr_image"]
    torch.manual_seed(0)
    assert torch.equal(a, ds[0]["lr_image"]) and not torch.equal(a, b)


def test_degraded_super_resolution_clean_pairs_usm_and_errors():
    clean = DegradedSuperResolution(HRList(), scale=4, no_degradation_prob=1.0, upsampled_key="up")[0]
    hr = HRList()[0]["image"]
    expected = F.interpolate((hr[None] + 1) / 2, size=(12, 12), mode="bicubic", antialias=True).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(clean["lr_image"], expected[0])
    torch.testing.assert_close(clean["up"], hr)
    sharp = DegradedSuperResolution(HRList(), scale=4, usm_sharpen=True, fixed=True)[0]["image"]
    assert not torch.equal(sharp, hr) and sharp.shape == hr.shape
    with pytest.raises(ValueError, match="not divisible by scale 3"):
        DegradedSuperResolution(HRList(size=32), scale=3)[0]
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        DegradedSuperResolution(HRList(), scale=2.5)


def test_degraded_super_resolution_from_config():
    cfg = {"target": "ldm.data.degraded.DegradedSuperResolution",
           "params": {"scale": 8, "degradation": {"preset": "realesrgan", "jpeg_range": [50, 90]}, "fixed": True,
                      "dataset": {"target": "ldm.data.photos.Photos",
                                  "params": {"split": "validation", "size": 64, "length": 2}}}}
    ds = instantiate_from_config(cfg)
    assert ds.config.jpeg_range == (50.0, 90.0) and ds[0]["lr_image"].shape == (3, 8, 8)
