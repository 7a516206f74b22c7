"""scripts/evaluate.py --task generation / superres / conditional on tiny random-weight runs, and the probe verdicts
of ldm.eval.conditional on hand cases. A stand-in probe (random weights, the default settings' cache file) keeps
these fast: the numbers are not judged here, the arms, groups, counts and protocol are."""
import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from ldm.data.shapes import COLORS, SHAPE_CLASSES
from ldm.eval import conditional
from ldm.eval.cli import main
from ldm.eval.probe import PROBE_VERSION, ProbeSettings, ShapesProbe
from ldm.sampling_conditions import Condition
from tests.test_ddpm import single_thread  # noqa: F401 - autouse fixture
from tests.test_sample_script import make_run


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    """A cache directory holding a random-weight probe under the default settings' key (report: all 1.0)."""
    root = tmp_path_factory.mktemp("probe")
    settings = ProbeSettings()
    torch.manual_seed(0)
    report = {k: 1.0 for k in ("class", "color", "centre_in_box")}
    torch.save({"version": PROBE_VERSION, "settings": asdict(settings), "report": report,
                "state_dict": ShapesProbe(settings.width, settings.feature_dim).state_dict()},
               root / f"shapes-probe-{settings.key()}.pt")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = make_run(tmp_path_factory.mktemp("runs"), name)
        return built[name]
    return get


def evaluate(tmp_path, capsys, *argv):
    out = tmp_path / "m.json"
    code = main([str(a) for a in (*argv, "--out", out)])
    return code, (json.loads(out.read_text()) if out.exists() else None), capsys.readouterr().err


# ---- hand cases ----------------------------------------------------------------------------------------------------
class StubProbe:
    """Reads every image as class 1 ('square'), colour 2 ('blue'), centre (0.3, 0.3)."""

    def predict(self, x):
        n = len(x)
        return {"class": torch.full((n,), 1), "color": torch.full((n,), 2),
                "centre": torch.full((n, 2), 0.3), "box": torch.zeros(n, 4)}


def request(group, **target):
    return conditional.Request(Condition({}, {}, "x"), group, {k: torch.tensor(v) for k, v in target.items()})


def test_scores_count_each_attribute_per_group():
    requests = [request("seen/", **{"class": 1, "color": 2}), request("seen/", **{"class": 1, "color": 0}),
                request("heldout/", **{"class": 0, "color": 2})]
    samples = [torch.zeros(3, 3, 32, 32), torch.zeros(1, 3, 32, 32), torch.zeros(2, 3, 32, 32)]
    scores = conditional.score_requests(StubProbe(), requests, samples)
    assert scores == {"seen/class": 1.0, "seen/color": 0.75, "seen/class_and_color": 0.75, "seen/samples": 4.0,
                      "heldout/class": 0.0, "heldout/color": 1.0, "heldout/class_and_color": 0.0,
                      "heldout/samples": 2.0}
    boxes = [request("", box=[0.2, 0.2, 0.4, 0.4]), request("", box=[0.5, 0.5, 0.9, 0.9])]
    scores = conditional.score_requests(StubProbe(), boxes, [torch.zeros(1, 3, 32, 32)] * 2)
    assert scores == {"centre_in_box": 0.5, "samples": 2.0}


def test_every_group_gets_at_least_the_requested_count():
    requests = [request("seen/")] * 14 + [request("heldout/")] * 2
    counts = conditional.allot(requests, 200)
    assert counts[:14] == [15] * 14 and counts[14:] == [100, 100]


def test_heldout_pairs_come_from_the_training_data():
    from omegaconf import OmegaConf
    config = OmegaConf.create({"data": {"params": {"train": {"params": {"holdout": "exclude"}}}}})
    assert conditional.heldout_pairs(config) == {(COLORS.index("red"), SHAPE_CLASSES.index("triangle")),
                                                 (COLORS.index("blue"), SHAPE_CLASSES.index("circle"))}
    config.data.params.train.params.holdout_pairs = [["green", "star"]]
    assert conditional.heldout_pairs(config) == {(1, 3)}
    assert conditional.heldout_pairs(OmegaConf.create({})) == set()


# ---- the command line ----------------------------------------------------------------------------------------------
def test_generation_reports_model_floor_and_ceiling(runs, probe_cache, tmp_path, capsys):
    run = runs("ddpm_shapes_tiny.yaml")
    code, record, err = evaluate(tmp_path, capsys, "--run", run, "--task", "generation", "--fid", "probe",
                                 "--probe-cache", probe_cache, "--n", 8, "--steps", 2, "--batch_size", 4,
                                 "--floor", "--ceiling")
    assert code == 0, err
    for arm in ("model", "floor", "ceiling"):
        assert {f"{arm}/{k}" for k in ("fid", "kid_mean", "kid_std", "is_mean", "is_std")} <= set(record["metrics"])
    assert record["metrics"]["floor/fid"] < record["metrics"]["model/fid"]  # real test images beat 2-step noise
    assert (record["num_samples"], record["sampler"], record["steps"], record["image_size"]) == (8, "ddim", 2, 32)
    assert record["feature_extractor"].startswith("shapes-probe-") and len(record["feature_extractor_sha256"]) == 64


def test_generation_names_a_too_small_reference_split(runs, probe_cache, tmp_path, capsys):
    code, _, err = evaluate(tmp_path, capsys, "--run", runs("ddpm_shapes_tiny.yaml"), "--task", "generation",
                            "--fid", "probe", "--probe-cache", probe_cache, "--n", 100, "--steps", 2)
    assert code == 2 and "holds 64 images, 100 are needed" in err and "data.params.validation.params.length" in err


def test_conditional_class_and_layout_protocols(runs, probe_cache, tmp_path, capsys):
    code, record, err = evaluate(tmp_path, capsys, "--run", runs("ldm_shapes_class_tiny.yaml"), "--task",
                                 "conditional", "--probe-cache", probe_cache, "--n", 8, "--steps", 2, "--scale", 3)
    assert code == 0, err
    assert record["metrics"]["samples"] == 8 and 0 <= record["metrics"]["class"] <= 1
    assert record["metrics"]["probe_heldout/class"] == 1.0 and record["guidance_scale"] == 3.0
    code, record, err = evaluate(tmp_path, capsys, "--run", runs("ldm_shapes_layout_tiny.yaml"), "--task",
                                 "conditional", "--probe-cache", probe_cache, "--n", 6, "--steps", 2)
    assert code == 0, err
    assert record["metrics"]["samples"] == 6 and {"centre_in_box", "class"} <= set(record["metrics"])


def test_conditional_text_splits_seen_and_heldout_prompts(runs, probe_cache, tmp_path, capsys):
    code, record, err = evaluate(tmp_path, capsys, "--run", runs("ldm_shapes_text_tiny.yaml"), "--task",
                                 "conditional", "--probe-cache", probe_cache, "--n", 4, "--steps", 1,
                                 "--batch_size", 16)
    assert code == 0, err
    metrics = record["metrics"]
    assert metrics["seen/samples"] == 14 and metrics["heldout/samples"] == 4  # 14 prompts x 1, 2 held out x 2
    assert {"seen/class_and_color", "heldout/class_and_color"} <= set(metrics)


def test_conditional_refuses_a_model_it_cannot_judge(runs, probe_cache, tmp_path, capsys):
    code, _, err = evaluate(tmp_path, capsys, "--run", runs("ddpm_shapes_tiny.yaml"), "--task", "conditional",
                            "--probe-cache", probe_cache)
    assert code == 2 and "an unconditional model" in err


def test_superres_scores_samples_beside_bicubic(runs, tmp_path, capsys):
    code, record, err = evaluate(tmp_path, capsys, "--run", runs("ldm_photos_sr_tiny.yaml"), "--task", "superres",
                                 "--n", 4, "--steps", 2, "--lpips", "none", "--fid", "none")
    assert code == 0, err
    assert set(record["metrics"]) == {f"{arm}/{k}" for arm in ("model", "bicubic") for k in ("psnr_y", "ssim_y")}
    assert record["metrics"]["bicubic/psnr_y"] > record["metrics"]["model/psnr_y"]  # random weights vs bicubic
    assert "x4" in record["notes"] and record["image_size"] == 64


# ---- validation-time sample quality ----------------------------------------------------------------------------------
def test_sample_quality_callback_logs_fid_kid_is_per_validation_epoch(probe_cache, tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from ldm.eval.callback import SampleQuality
    from tests.test_ddpm import make_ddpm

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1}

    model = make_ddpm()
    callback = SampleQuality(num_samples=5, extractor="probe", probe_cache=str(probe_cache), steps=2)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=1,
                         callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(Images(), batch_size=2), DataLoader(Images(), batch_size=2))
    logged = trainer.callback_metrics
    assert {"val/fid", "val/kid_mean", "val/kid_std", "val/is_mean"} <= set(logged)
    assert all(torch.isfinite(logged[k]) for k in ("val/fid", "val/kid_mean", "val/is_mean"))
    assert callback.metrics.fid.fake_features_num_samples == 5  # the share, across batches of 2 (sanity check skipped)


def test_sample_quality_rejects_unknown_settings():
    from ldm.eval.callback import SampleQuality
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="extractor='clip'"):
        SampleQuality(extractor="clip")
    with pytest.raises(ConfigError, match="sampler='lms'"):
        SampleQuality(sampler="lms")
    with pytest.raises(ConfigError, match="schedule='karras'"):
        SampleQuality(sampler="ddim", schedule="karras")
