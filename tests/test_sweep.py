"""main.py --sweep (grid, zip, list, random over dotlist keys and seeds; skip finished, retry failed) and
scripts/sweep_report.py (CSV and plot of final metrics against the swept values)."""
import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import main
from ldm import cli, cluster, sweep
from ldm.util import ConfigError
from tests.test_main import toy_yaml  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sweep_report_script", REPO / "scripts" / "sweep_report.py")
sweep_report_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep_report_script)


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------- expansion

def test_grid_crosses_every_value_and_seed_in_a_fixed_order():
    runs = sweep.expand({"method": "grid", "seeds": [0, 1],
                         "parameters": {"model.base_learning_rate": [1e-4, 2e-4], "model.params.x": [1, 2, 3]}})
    assert len(runs) == 12 and [r.index for r in runs] == list(range(12))
    assert (runs[0].overrides, runs[0].seed, runs[1].seed) == ({"model.base_learning_rate": 1e-4, "model.params.x": 1},
                                                                0, 1)
    assert runs[11].overrides == {"model.base_learning_rate": 2e-4, "model.params.x": 3}
    assert runs[0].name == "000_base_learning_rate=0.0001_x=1_seed=0"
    assert len({r.name for r in runs}) == 12


def test_zip_list_and_random():
    zipped = sweep.expand({"method": "zip", "parameters": {"a.b": [1, 2], "c.d": ["x", "y"]}})
    assert [r.overrides for r in zipped] == [{"a.b": 1, "c.d": "x"}, {"a.b": 2, "c.d": "y"}]
    listed = sweep.expand({"method": "list", "seeds": [7, 8], "runs": [{"a.b": 1}, {"a.b": 2, "seed": 3}]})
    assert [(r.overrides, r.seed) for r in listed] == [({"a.b": 1}, 7), ({"a.b": 1}, 8), ({"a.b": 2}, 3)]
    random_spec = {"method": "random", "num_runs": 20, "parameters": {
        "model.base_learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
        "model.params.width": [16, 32], "model.params.depth": {"low": 1, "high": 4, "int": True}}}
    drawn = sweep.expand(random_spec)
    assert drawn == sweep.expand(random_spec)  # seeded: a re-run finds the same runs
    assert drawn != sweep.expand({**random_spec, "random_seed": 1})
    lrs = [r.overrides["model.base_learning_rate"] for r in drawn]
    assert all(1e-5 <= lr <= 1e-3 for lr in lrs) and min(lrs) < 1e-4 < max(lrs)  # spread over the decades
    assert {r.overrides["model.params.width"] for r in drawn} == {16, 32}
    assert {r.overrides["model.params.depth"] for r in drawn} <= {1, 2, 3, 4}


def test_run_words_read_back_as_the_same_values():
    run = sweep.SweepRun(0, {"a.b": 1e-5, "c.d": [1, 2.5], "e": True, "f": "x y", "g": None, "h": {"k": 1}}, 3)
    words = run.argv()
    assert words[-2:] == ["-s", "3"]
    assert OmegaConf.to_container(OmegaConf.from_dotlist(words[:-2])) == {
        "a": {"b": 1e-5}, "c": {"d": [1, 2.5]}, "e": True, "f": "x y", "g": None, "h": {"k": 1}}
    assert all(cli.is_override(w) for w in words[:-2])


@pytest.mark.parametrize("content, message", [
    ({"paramters": {"a.b": [1]}}, "unknown key 'paramters' (did you mean 'parameters'?)"),
    ({"method": "bayes", "parameters": {"a.b": [1]}}, "method 'bayes' is not one of grid, zip, list, random"),
    ({"method": "zip", "parameters": {"a.b": [1, 2], "c.d": [1]}}, "lists of one length (a.b: 2, c.d: 1)"),
    ({"parameters": {"a.b": 3}}, "parameters.a.b must be a non-empty list"),
    ({"method": "random", "parameters": {"a.b": [1]}}, "needs num_runs"),
    ({"method": "random", "num_runs": 2, "parameters": {"a.b": {"low": 1}}}, "list of choices or {low, high"),
    ({"parameters": {"not a key": [1]}}, "'not a key' is not a dotlist key"),
    ({"method": "list", "runs": []}, "needs `runs`"),
])
def test_sweep_file_mistakes_name_the_file_and_key(tmp_path, content, message):
    path = write(tmp_path / "sweep.yaml", content)
    with pytest.raises(ConfigError) as err:
        sweep.load_spec(path)
    assert message in str(err.value) and path in str(err.value)


def test_main_reports_a_bad_sweep_file_with_status_2(tmp_path, toy_yaml, capsys):
    assert main.main(["-b", toy_yaml, "-t", "--sweep", str(tmp_path / "none.yaml")]) == 2
    assert f"sweep file not found: {tmp_path / 'none.yaml'}" in capsys.readouterr().err


# ---------------------------------------------------------------- report

def fake_sweep(folder: Path) -> Path:
    """A sweep folder as main.py --sweep leaves it: two finished runs (CSV metrics) and one failed."""
    runs = [{"index": i, "name": f"00{i}_lr={lr}", "dir": f"T_00{i}_lr={lr}", "overrides": {"model.lr": lr},
             "seed": 0} for i, lr in enumerate([1e-4, 1e-3, 1e-2])]
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"timestamp": "T", "runs": runs, "spec": {"metric": "val/loss"}}))
    for run, status, loss in zip(runs, ["finished", "finished", "failed"], [0.5, 0.25, None]):
        logdir = folder / run["dir"]
        (logdir / "csv").mkdir(parents=True)
        cluster.write_status(str(logdir / "sweep_run.json"), "running")
        cluster.write_status(str(logdir / "sweep_run.json"), status)
        if loss is not None:
            (logdir / "csv" / "metrics.csv").write_text(f"epoch,step,train/loss,val/loss\n0,1,0.9,\n0,2,,{loss}\n")
    return folder


def test_report_writes_csv_and_plot_and_lists_failed_runs(tmp_path, capsys):
    folder = fake_sweep(tmp_path / "sw")
    assert sweep_report_script.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 runs finished; val/loss" in out and "not finished: 002_lr=0.01 (failed, 1 attempt(s))" in out
    with open(folder / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["model.lr"], r["val/loss"]) for r in rows] == [
        ("000_lr=0.0001", "finished", "0.0001", "0.5"), ("001_lr=0.001", "finished", "0.001", "0.25"),
        ("002_lr=0.01", "failed", "0.01", "")]
    assert rows[0]["train/loss"] == "0.9"
    assert (folder / "report.png").stat().st_size > 5000
    assert sweep_report_script.main([str(folder), "--metric", "val/acc"]) == 2
    assert "val/acc" in capsys.readouterr().err
    assert sweep_report_script.main([str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


# ---------------------------------------------------------------- launching (processes)

@pytest.mark.slow
def test_sweep_skips_finished_runs_and_retries_failed_ones(tmp_path, toy_yaml, monkeypatch, capsys):
    monkeypatch.delenv(cli.TIMESTAMP_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flag = tmp_path / "flag"
    sweep_file = write(tmp_path / "dims.yaml", {"method": "list", "runs": [
        {"model.params.embed_dim": 2}, {"model.params.embed_dim": 3, "seed": 5},
        {"model.params.embed_dim": 4, "model.params.require_file": str(flag)}]})
    argv = ["-b", toy_yaml, "-t", "-l", str(tmp_path / "logs"), "--sweep", sweep_file,
            "lightning.logger.target=pytorch_lightning.loggers.CSVLogger"]
    assert main.main(argv) == 1  # one after another, local processes; the third fails
    folder = tmp_path / "logs" / "dims"
    state = json.loads((folder / "sweep.json").read_text())
    statuses = {r["name"]: cluster.read_status(str(folder / r["dir"] / "sweep_run.json")) for r in state["runs"]}
    assert [s["status"] for s in statuses.values()] == ["finished", "finished", "failed"]
    assert statuses["001_embed_dim=3_seed=5"]["overrides"] == {"model.params.embed_dim": 3}
    assert statuses["001_embed_dim=3_seed=5"]["seed"] == 5
    flag.write_text("")
    assert main.main(argv + ["--slurm", "cluster=local"]) == 0  # a submitit job array, on this machine
    assert "3 runs, 2 finished before (skipped), 1 to run" in capsys.readouterr().out
    again = {r["name"]: cluster.read_status(str(folder / r["dir"] / "sweep_run.json")) for r in state["runs"]}
    assert [(s["status"], s["attempts"]) for s in again.values()] == [("finished", 1), ("finished", 1),
                                                                      ("finished", 2)]
    assert len([p for p in folder.iterdir() if (p / "sweep_run.json").exists()]) == 3
    project = yaml.safe_load(next((folder / state["runs"][2]["dir"] / "configs").glob("*-project.yaml")).read_text())
    assert project["model"]["params"]["embed_dim"] == 4  # the override, recorded with the run
    assert sweep_report_script.main([str(folder)]) == 0
    with open(folder / "report.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["finished"] * 3
