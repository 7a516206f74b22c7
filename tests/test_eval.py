"""ldm/eval: metrics against hand-computed cases, feature extractors, the protocol record, the Shapes probe."""
import hashlib
import json
import math
import warnings

import pytest
import torch

from ldm.eval import (EvalProtocol, GenerativeMetrics, InceptionFeatures, ProbeAccuracyError, ProbeFeatures,
                      ProbeSettings, ReconstructionMetrics, ShapesProbe, box_iou, build_feature_extractor,
                      centre_in_box, check_probe_accuracy, evaluate_probe, load_or_train_probe, probe_cache_dir,
                      psnr, rgb_to_y, ssim)
from ldm.eval.features import as_unit_float
from ldm.eval.probe import GRID, centre_cell, degrade, dominance, gaussian_blur, render_split, train_probe
from ldm.losses import build_lpips

TINY_PROBE = ProbeSettings(train_length=64, val_length=32, epochs=1, batch_size=32, width=8, feature_dim=16)


def images(n=4, size=32, seed=0):
    """Random [-1, 1] images (n, 3, size, size)."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- PSNR / SSIM / LPIPS

def test_psnr_identical_is_inf_and_constant_shift_is_closed_form():
    x = torch.zeros(2, 3, 16, 16)  # 0.5 in [0, 1]
    assert torch.isinf(psnr(x, x)).all()
    shift = torch.tensor([0.2, 0.02]).view(2, 1, 1, 1)  # [-1, 1] units: 0.1 and 0.01 in [0, 1]
    assert torch.allclose(psnr(x + shift, x), torch.tensor([20.0, 40.0]), atol=1e-4)


def test_y_channel_is_bt601_and_its_psnr_is_closed_form():
    black, white = -torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert torch.allclose(rgb_to_y((black + 1) / 2), torch.full((1, 1, 4, 4), 16 / 255))
    assert torch.allclose(rgb_to_y((white + 1) / 2), torch.full((1, 1, 4, 4), 235 / 255))
    x = torch.zeros(1, 3, 16, 16)
    expected = -20 * math.log10(0.1 * 219 / 255)  # a 0.1 RGB shift moves Y by 0.1 * 219/255
    assert psnr(x + 0.2, x, y_channel=True).item() == pytest.approx(expected, abs=1e-4)


def test_crop_border_ignores_the_border():
    x = images(1, 16)
    y = x.clone()
    y[..., :2, :] = -x[..., :2, :]
    assert math.isfinite(psnr(y, x).item())
    assert torch.isinf(psnr(y, x, crop_border=2)).all()
    with pytest.raises(ValueError, match="crop_border"):
        psnr(y, x, crop_border=8)


def test_ssim_identical_is_one_and_unrelated_is_low():
    x, y = images(3, 32, seed=0), images(3, 32, seed=1)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert torch.allclose(ssim(x, x, y_channel=True), torch.ones(3), atol=1e-6)
    assert (ssim(x, y) < 0.2).all()


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(images(2, 16), images(2, 32))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        ssim(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips(pretrained_backbone=False, net="squeeze")  # random trunk, smallest: fast


def test_reconstruction_metrics_accumulate_per_image_means(random_lpips):
    metric = ReconstructionMetrics(lpips_net=random_lpips)
    x = torch.zeros(2, 3, 32, 32)
    metric.update(x + 0.2, x)   # 20 dB each
    metric.update(x + 0.02, x)  # 40 dB each
    out = metric.compute()
    assert set(out) == {"psnr", "ssim", "lpips"}
    assert out["psnr"].item() == pytest.approx(30.0, abs=1e-3)
    assert 0 < out["lpips"].item()
    metric.reset()
    x = images(2, 32)
    metric.update(x, x)
    out = metric.compute()
    assert math.isinf(out["psnr"].item()) and out["ssim"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["lpips"].item() == pytest.approx(0.0, abs=1e-6)  # identical images: LPIPS 0


def test_reconstruction_metrics_y_channel_keys():
    metric = ReconstructionMetrics(y_channel=True, crop_border=4)
    x = images(2, 32)
    metric.update(x, x)
    assert set(metric.compute()) == {"psnr_y", "ssim_y"}


# ----------------------------------------------------------------------------- FID / KID / IS

@pytest.fixture(scope="module")
def random_probe_features():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ProbeFeatures(ShapesProbe(width=8, feature_dim=16), name="random-probe", weights_sha256="0" * 64)


def test_probe_features_accept_uint8_and_unit_float(random_probe_features):
    x01 = (images(3, 32) + 1) / 2
    as_uint8 = (x01 * 255).round().to(torch.uint8)
    a, b = random_probe_features(as_uint8), random_probe_features(as_uint8.float() / 255)
    assert a.shape == (3, 16) and torch.allclose(a, b)
    assert random_probe_features(torch.rand(2, 3, 64, 64)).shape == (2, 16)  # resized to 32
    assert random_probe_features.logits(as_uint8).shape == (3, 4)
    with pytest.raises(ValueError, match="map \\[-1, 1\\] images"):
        random_probe_features(images(2, 32))


def test_generative_metrics_identical_sets_give_zero(random_probe_features):
    metric = GenerativeMetrics(random_probe_features, kid_subsets=10, kid_subset_size=50)
    x = images(64, 32)
    metric.update(x, real=True)
    metric.update(x, real=False)
    same = metric.compute()
    assert same["kid_subset_size"] == 50 and "is_mean" in same
    metric.reset()
    metric.update(x, real=True)
    metric.update((x + 0.5).clamp(-1, 1), real=False)  # a brighter set
    shifted = metric.compute()
    assert shifted["fid"] > 0 and shifted["kid_mean"] > 0
    assert abs(same["fid"]) < 1e-6 * shifted["fid"] and abs(same["kid_mean"]) < 1e-2 * shifted["kid_mean"]


class MeanColour(torch.nn.Module):
    """A hand-checkable extractor: features = per-channel means in [0, 1]; logits = 50 x those means."""
    name, num_features, weights_sha256 = "mean-colour", 3, ""

    def forward(self, imgs):
        return as_unit_float(imgs, "MeanColour").mean((2, 3))  # (B, 3)

    def logits(self, imgs):
        return 50 * self(imgs)  # (B, 3): pure red / green images are near one-hot


def levels(n, seed=0, high=200):
    """[-1, 1] images on exact uint8 levels (so the uint8 quantisation is lossless) and the levels."""
    k = torch.randint(0, high + 1, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    return k / 127.5 - 1, k


def test_fid_of_a_constant_shift_is_the_squared_mean_difference():
    metric = GenerativeMetrics(MeanColour(), kid=False)
    x, _ = levels(50)
    metric.update(x, real=True)
    metric.update(x + 51 / 127.5, real=False)  # +51 levels: +0.2 on every channel, same covariance
    assert metric.compute()["fid"] == pytest.approx(3 * 0.2**2, rel=1e-4)


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # is_std of a single split is undefined
def test_inception_score_closed_forms():
    red, green = torch.tensor([1.0, -1, -1]), torch.tensor([-1.0, 1, -1])
    two_classes = torch.stack([red] * 10 + [green] * 10).view(20, 3, 1, 1).expand(20, 3, 8, 8)
    metric = GenerativeMetrics(MeanColour(), fid=False, kid=False, is_splits=1)
    metric.update(two_classes, real=False)
    assert metric.compute()["is_mean"] == pytest.approx(2.0, rel=1e-5)  # confident, 2 classes equally: exp(log 2)
    metric.reset()
    metric.update(two_classes[:10], real=False)
    assert metric.compute()["is_mean"] == pytest.approx(1.0, rel=1e-5)  # one class: KL 0


def test_extractor_without_logits_skips_inception_score(random_probe_features):
    class NoLogits(torch.nn.Module):
        name, num_features, weights_sha256, logits = "plain", 16, "", None

        def forward(self, imgs):
            return random_probe_features(imgs)

    metric = GenerativeMetrics(NoLogits(), kid=False)
    metric.update(images(8, 32, seed=1), real=True)
    metric.update(images(8, 32, seed=2), real=False)
    assert set(metric.compute()) == {"fid"}
    with pytest.raises(ValueError, match="lacks `name`"):
        GenerativeMetrics(torch.nn.Identity())


def test_inception_without_weights_names_the_file_to_place(tmp_path):
    missing = tmp_path / "nowhere" / "weights-inception.pth"
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth") as err:
        build_feature_extractor("inception", weights_path=missing)
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match="must be one of"):
        build_feature_extractor("clip")


@pytest.mark.slow
def test_inception_features_from_a_weights_file(tmp_path, monkeypatch):
    """The standard path with a randomly initialised weights file (the real one cannot be downloaded here)."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")  # an optional dependency
    FeatureExtractorInceptionV3 = fidelity.FeatureExtractorInceptionV3
    empty, random_file = tmp_path / "empty.pth", tmp_path / "random-inception.pth"
    torch.save({}, empty)
    with monkeypatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.save(InceptionFeatures(empty).net.state_dict(), random_file)
    extractor = InceptionFeatures(random_file)
    assert extractor.weights_sha256 == hashlib.sha256(random_file.read_bytes()).hexdigest()
    x = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    assert extractor(x).shape == (2, 2048) and extractor.logits(x).shape == (2, 1008)
    extractor.train()
    assert not extractor.net.training


# ----------------------------------------------------------------------------- protocol record

PROTOCOL_TYPES = {"num_samples": int, "sampler": str, "steps": int, "eta": float, "guidance_scale": float,
                  "seed": int, "image_size": int, "feature_extractor": str, "feature_extractor_sha256": str,
                  "data_split": str, "dataset": str, "checkpoint": str, "notes": str, "sigma_schedule": str, "date": str,
                  "machine": str, "metrics": dict, "definitions": dict}


def protocol(**overrides):
    fields = dict(num_samples=1000, sampler="ddim", steps=50, eta=0.0, guidance_scale=1.5, seed=23,
                  image_size=32, feature_extractor="shapes-probe-abc", feature_extractor_sha256="f" * 64,
                  data_split="validation", dataset="Shapes(max_objects=2)", metrics={"fid": 1.25})
    return EvalProtocol(**{**fields, **overrides})


def test_protocol_json_has_every_field_typed(tmp_path):
    path = protocol().save(tmp_path / "eval" / "protocol.json")
    data = json.loads(path.read_text())
    assert set(data) == set(PROTOCOL_TYPES)
    for key, kind in PROTOCOL_TYPES.items():
        assert isinstance(data[key], kind), key
    assert data["date"][:2] == "20" and "torch" in data["machine"] and "psnr_y" in data["definitions"]
    assert EvalProtocol.load(path) == protocol(date=data["date"], machine=data["machine"])


def test_protocol_rejects_wrong_types_and_unknown_keys(tmp_path):
    with pytest.raises(TypeError, match="EvalProtocol.steps"):
        protocol(steps="50")
    with pytest.raises(TypeError, match="EvalProtocol.seed"):
        protocol(seed=True)
    with pytest.raises(TypeError, match="metrics\\['fid'\\]"):
        protocol(metrics={"fid": "low"})
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**json.loads(protocol().to_json()), "cfg": 3.0}))
    with pytest.raises(ValueError, match="unknown protocol key.*cfg"):
        EvalProtocol.load(path)


# ----------------------------------------------------------------------------- Shapes probe

def test_centre_in_box_and_iou_hand_cases():
    boxes = torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.2, 0.2, 0.6, 0.6]])
    centres = torch.tensor([[0.4, 0.6], [0.61, 0.4]])
    assert centre_in_box(centres, boxes).tolist() == [True, False]
    other = torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.4, 0.2, 0.8, 0.6]])
    assert torch.allclose(box_iou(boxes, other), torch.tensor([1.0, 1 / 3]))


def test_dominance_and_centre_cell_hand_cases():
    objects = torch.tensor([[[0, .1, .1, .5, .5], [1, .6, .6, .8, .8]],   # longer sides 0.4 and 0.2
                            [[2, .0, .0, .3, .2], [-1, 0, 0, 0, 0]]])      # alone
    ratio = dominance(objects)
    assert ratio[0].item() == pytest.approx(2.0) and math.isinf(ratio[1].item())
    boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.9, 0.9, 1.0, 1.0], [0.2, 0.6, 0.3, 0.7]])
    assert centre_cell(boxes).tolist() == [0, GRID * GRID - 1, 5 * GRID + 2]  # row 5, column 2


@pytest.fixture(scope="module")
def tiny_probe_data():
    return render_split("train", TINY_PROBE.train_length, TINY_PROBE)


def test_probe_data_holds_the_dominant_object(tiny_probe_data):
    data = tiny_probe_data
    assert data["image"].dtype == torch.uint8 and data["image"].shape == (64, 3, 32, 32)
    box = data["box"]
    assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
    assert set(data["class"].tolist()) <= {0, 1, 2, 3} and set(data["color"].tolist()) <= {0, 1, 2, 3}
    assert (data["dominance"] >= 1).all()  # row 0 is the largest


def test_gaussian_blur_closed_forms():
    delta = torch.zeros(2, 1, 15, 15)
    delta[:, :, 7, 7] = 1.0
    out = gaussian_blur(delta, torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0], delta[0])                                  # std 0: unchanged
    grid = torch.arange(15.0) - 7
    var_x = (out[1, 0].sum(0) * grid ** 2).sum()                               # second moment along x
    assert out[1].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert var_x.item() == pytest.approx(1.0, abs=0.02)                      # the 7-tap kernel truncates at 3 std
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.0])), flat)    # edges replicated: flat stays flat


def test_probe_degradation_is_drawn_from_its_generator():
    x = images(4)
    a = degrade(x, 1.2, 0.05, torch.Generator().manual_seed(0))
    b = degrade(x, 1.2, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.abs().max() <= 1


def test_probe_training_is_deterministic_under_a_seed(tiny_probe_data):
    a = train_probe(TINY_PROBE, tiny_probe_data).state_dict()
    b = train_probe(TINY_PROBE, tiny_probe_data).state_dict()
    c = train_probe(ProbeSettings(**{**TINY_PROBE.__dict__, "seed": 1}), tiny_probe_data).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_probe_cache_is_keyed_by_settings_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "root"))
    assert probe_cache_dir() == tmp_path / "root" / "probe"
    assert probe_cache_dir(tmp_path / "x") == tmp_path / "x"
    logs: list[str] = []
    with pytest.warns(UserWarning, match="below the 98% held-out accuracy bar"):
        first = load_or_train_probe(TINY_PROBE, strict=False, num_workers=0, log=logs.append)
    assert first.path == tmp_path / "root" / "probe" / f"shapes-probe-{TINY_PROBE.key()}.pt"
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    rates = {"class", "color", "class_and_color", "centre_in_box", "box_iou"}
    blurred = {"class_blur1", "color_blur1", "centre_in_box_blur1"}
    assert set(first.report) == rates | {f"{k}_clear" for k in rates} | {"clear_fraction"} | blurred
    n_logs = len(logs)
    with pytest.raises(ProbeAccuracyError, match="verdicts do not count"):
        load_or_train_probe(TINY_PROBE, strict=True, log=logs.append)
    assert len(logs) == n_logs  # loaded from the cache, not retrained
    assert ProbeSettings(seed=1).key() != ProbeSettings().key()


def test_check_probe_accuracy_names_the_weak_attribute():
    good = {"class": 0.99, "color": 1.0, "centre_in_box": 0.985, "class_clear": 0.95, "box_iou": 0.8}
    assert check_probe_accuracy(good)
    with pytest.raises(ProbeAccuracyError, match="\\['color'\\]"):
        check_probe_accuracy({**good, "color": 0.9})
    with pytest.raises(ProbeAccuracyError, match="centre_in_box"):
        check_probe_accuracy({**good, "centre_in_box": float("nan")})  # nothing measured: not passed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not check_probe_accuracy({**good, "color": 0.9}, strict=False)


def test_probe_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="ShapesProbe: images must be"):
        ShapesProbe(width=8, feature_dim=16)(torch.zeros(1, 3, 64, 64))


@pytest.mark.slow
def test_probe_learns_from_a_reduced_budget():
    """~70 steps instead of ~1250 (scripts/train_probe.py reaches the 98% bar): well above chance (25%)."""
    settings = ProbeSettings(train_length=3000, val_length=500, epochs=3)
    probe = train_probe(settings, render_split("train", settings.train_length, settings, num_workers=2))
    report = evaluate_probe(probe, render_split("validation", settings.val_length, settings))
    assert report["color_clear"] > 0.85 and report["class_clear"] > 0.4, report  # measured: 0.96, 0.51
    assert report["centre_in_box_clear"] > 0.75, report                            # measured: 0.90
