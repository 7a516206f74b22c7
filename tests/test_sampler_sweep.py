"""scripts/sampler_sweep.py on tiny random-weight runs (a class LDM and a pixel DDPM) with a stand-in probe: every
figure is what scripts/evaluate.py reports for the same setting, and the three outputs are written."""
import importlib.util
import json
from pathlib import Path

import pytest

from ldm.eval import cli as evaluate_cli
from tests.test_ddpm import single_thread  # noqa: F401 - autouse fixture
from tests.test_evaluate_sampling import probe_cache  # noqa: F401 - fixture
from tests.test_sample_script import make_run

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("sampler_sweep", REPO / "scripts" / "sampler_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root, "ldm_shapes_class_tiny.yaml"), make_run(root, "ddpm_shapes_tiny.yaml", timesteps=50)


def sweep(out, runs, probe_cache, *extra):
    argv = ["--run", runs[0], "--run", runs[1], "--samplers", "ddim", "dpmpp_2m", "heun", "--steps", 1, 2,
            "--n", 4, "--batch_size", 4, "--scale", 2, "--probe-cache", probe_cache, "--out", out,
            *extra, "data.params.validation.params.length=8"]
    return _load_script().main([str(a) for a in argv])


def test_sweep_writes_evaluate_figures_table_and_plot(runs, probe_cache, tmp_path, capsys):  # noqa: F811
    assert sweep(tmp_path, runs, probe_cache) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["protocol"]["n"] == 4 and data["protocol"]["steps"] == [1, 2]
    class_run, ddpm_run = data["runs"]
    assert (class_run["kind"], class_run["metric"], class_run["guidance_scale"]) == ("class", "class", 2.0)
    assert (ddpm_run["kind"], ddpm_run["metric"], ddpm_run["guidance_scale"]) == ("unconditional", "model/fid", 1.0)
    settings = [(r["sampler"], r["schedule"], r["steps"], r["nfe"]) for r in ddpm_run["results"]]
    assert settings == [("ddim", "", 1, 1), ("ddim", "", 2, 2), ("dpmpp_2m", "karras", 1, 1),
                        ("dpmpp_2m", "karras", 2, 2), ("heun", "karras", 1, 1), ("heun", "karras", 2, 3)]
    # the figure is evaluate.py's for the same setting
    heun = ddpm_run["results"][-1]
    out = tmp_path / "heun.json"
    assert evaluate_cli.main([str(a) for a in ("--run", runs[1], "--task", "generation", "--fid", "probe",
                                               "--probe-cache", probe_cache, "--n", 4, "--batch_size", 4,
                                               "--sampler", "heun", "--schedule", "karras", "--steps", 2, "--out",
                                               out, "data.params.validation.params.length=8")]) == 0
    record = json.loads(out.read_text())
    assert heun["value"] == pytest.approx(record["metrics"]["model/fid"], rel=1e-6)
    assert record["sigma_schedule"] == "karras"
    table = (tmp_path / "results.md").read_text()
    assert "| sampler | 1 steps | 2 steps |" in table and "(3 NFE)" in table and "probe-FID, lower is better" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_a_rerun_reuses_the_figures_and_errors_are_clear(runs, probe_cache, tmp_path, monkeypatch,  # noqa: F811
                                                         capsys):
    assert sweep(tmp_path, runs, probe_cache) == 0
    monkeypatch.setattr(evaluate_cli, "RUNNERS", {})               # any new figure would fail
    assert sweep(tmp_path, runs, probe_cache) == 0
    sr = make_run(tmp_path / "sr", "ldm_photos_sr_tiny.yaml")
    assert _load_script().main(["--run", str(sr), "--out", str(tmp_path / "x")]) == 2
    assert "an image-conditional model (super-resolution / semantic map); the sweep measures class, text" \
        in capsys.readouterr().err
