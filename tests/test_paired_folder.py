"""PairedImageFolder: real LR/HR pairs matched by name, aligned crops, clear errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data.paired_folder import PairedImageFolder


def write_pair(hr_root: Path, lr_root: Path, name: str, w: int, h: int, scale: int, seed: int,
               hr_name: str | None = None, lr_name: str | None = None, lr_size: tuple[int, int] | None = None):
    """HR random pixels; LR = the exact mean of each scale x scale HR block (so crops can be checked)."""
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
    lr = hr.reshape(h // scale, scale, w // scale, scale, 3).mean(axis=(1, 3))
    for root, arr, file in ((hr_root, hr, hr_name or name), (lr_root, lr, lr_name or name)):
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.round(arr).astype(np.uint8))
        if root is lr_root and lr_size is not None:
            img = img.resize(lr_size)
        img.save(root / file)


@pytest.fixture
def roots(tmp_path):
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    hr.mkdir(), lr.mkdir()
    return hr, lr


def assert_aligned(sample, scale):
    """avg-pooling the HR crop gives the LR crop (to 8-bit rounding): same place, same mirroring."""
    pooled = F.avg_pool2d(sample["image"][None], scale)[0]
    assert (pooled - sample["lr_image"]).abs().max() < 1.01 / 127.5


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_random_crops_are_aligned_and_sized(roots, scale):
    hr, lr = roots
    write_pair(hr, lr, "a.png", 24 * scale, 18 * scale, scale, 0)
    write_pair(hr, lr, "sub/b.png", 30 * scale, 16 * scale, scale, 1)
    ds = PairedImageFolder(hr, lr, scale=scale, size=8 * scale, upsampled_key="lr_up")
    assert len(ds) == 2 and ds.names == ["a", "sub/b"]
    torch.manual_seed(0)
    crops = set()
    for i in [0, 1] * 8:
        s = ds[i]
        assert s["image"].shape == (3, 8 * scale, 8 * scale) and s["lr_image"].shape == (3, 8, 8)
        assert s["lr_up"].shape == (3, 8 * scale, 8 * scale) and s["file_name"] == ds.names[i]
        assert_aligned(s, scale)
        crops.add((i, s["image"].sum().item()))
    assert len(crops) > 4                                    # positions vary between calls
    center = PairedImageFolder(hr, lr, scale=scale, size=8 * scale, crop="center")
    plain = PairedImageFolder(hr, lr, scale=scale, size=8 * scale, crop="center", flip=False)[0]
    mirrored = [torch.equal(center[0]["image"], plain["image"].flip(-1)) for _ in range(12)]
    assert any(mirrored) and not all(mirrored)


def test_center_crop_whole_images_and_suffixes(roots):
    hr, lr = roots
    write_pair(hr, lr, "", 64, 48, 4, 2, hr_name="Canon_001_HR.png", lr_name="Canon_001_LR4.png")
    ds = PairedImageFolder(hr, lr, scale=4, size=None, hr_suffix="_HR", lr_suffix="_LR4")
    s = ds[0]
    assert s["image"].shape == (3, 48, 64) and s["lr_image"].shape == (3, 12, 16) and s["file_name"] == "Canon_001"
    assert_aligned(s, 4)
    c = PairedImageFolder(hr, lr, scale=4, size=16, crop="center", flip=False, hr_suffix="_HR", lr_suffix="_LR4")
    assert torch.equal(c[0]["image"], s["image"][:, 16:32, 24:40])


def test_lr_at_hr_size(roots):
    hr, lr = roots
    write_pair(hr, lr, "a.png", 32, 32, 4, 3, lr_size=(32, 32))
    ds = PairedImageFolder(hr, lr, scale=4, size=16, lr_upsampled=True, upsampled_key="lr_up")
    s = ds[0]
    assert s["lr_image"].shape == (3, 4, 4) and s["lr_up"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"expected LR 8x8 \(scale 4\)"):
        PairedImageFolder(hr, lr, scale=4, size=16)


def test_missing_partners_are_named(roots):
    hr, lr = roots
    write_pair(hr, lr, "a.png", 32, 32, 4, 0)
    write_pair(hr, lr, "b.png", 32, 32, 4, 1)
    (lr / "b.png").unlink()
    with pytest.raises(ValueError, match=r"1 HR file\(s\) have no LR partner.*b\.png"):
        PairedImageFolder(hr, lr, scale=4, size=16)
    (hr / "b.png").unlink()
    Image.new("RGB", (8, 8)).save(lr / "c.jpg")
    with pytest.raises(ValueError, match=r"1 LR file\(s\) have no HR partner.*c\.jpg"):
        PairedImageFolder(hr, lr, scale=4, size=16)


def test_size_errors_name_both_files(roots):
    hr, lr = roots
    write_pair(hr, lr, "a.png", 32, 32, 4, 0)
    with pytest.raises(ValueError, match=r"LR .*a\.png is 8x8 but its HR partner .*a\.png is 32x32; expected LR 16x16"):
        PairedImageFolder(hr, lr, scale=2, size=16)
    with pytest.raises(ValueError, match=r"32x32, not divisible by scale 3"):
        PairedImageFolder(hr, lr, scale=3, size=None)
    with pytest.raises(ValueError, match="smaller than the crop size 64"):
        PairedImageFolder(hr, lr, scale=4, size=64)
    with pytest.raises(ValueError, match="multiple of scale 4"):
        PairedImageFolder(hr, lr, scale=4, size=18)
    Image.new("RGB", (32, 32)).save(hr / "a.jpg")
    with pytest.raises(ValueError, match="both match the name 'a'"):
        PairedImageFolder(hr, lr, scale=4, size=16)
