"""`main.py --sweep sweep.yaml`: many runs of one config, each with its own overrides and seed (Lightning-free).

    name: lr_width              # the sweep's folder under --logdir (default: the file's stem; -n wins)
    method: grid                # grid (every combination), zip (the i-th values together), list, random
    parameters:                 # dotlist keys -> values; `seed` is main.py's --seed
      model.base_learning_rate: [1.0e-5, 5.0e-5]
      model.params.unet_config.params.model_channels: [16, 32]
    seeds: [0, 1]               # optional: every point once per seed

`list` takes `runs: [{key: value, ...}, ...]`; `random` takes `num_runs` and `random_seed` and draws each
parameter from a list (a choice) or from `{low, high, log: false, int: false}`.

The sweep folder holds `sweep.json` (the command, the timestamp all its runs share, every run's overrides) and one
run directory per point, `<ts>_<NNN>_<key=value...>`, each with `sweep_run.json` (overrides, seed, status:
queued, running, finished, failed or preempted, attempts, job id). A re-run of the same command skips finished
runs and launches the others again (a run with a last.ckpt continues from it). Runs go through submitit: local
processes, one after another or `--jobs N` at once, or a SLURM job array with `--slurm ...`.
"""
import dataclasses
import difflib
import itertools
import json
import math
import os
import random
import re
import time
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm import cli, cluster
from ldm.util import ConfigError

METHODS = ("grid", "zip", "list", "random")
TOP_KEYS = ("name", "method", "parameters", "runs", "seeds", "num_runs", "random_seed", "metric")
STATE_FILE, RUN_STATUS = "sweep.json", "sweep_run.json"


@dataclasses.dataclass
class SweepRun:
    index: int
    overrides: dict[str, Any]           # dotlist key -> value
    seed: int | None                    # main.py --seed (None: its default)

    @property
    def name(self) -> str:
        """`NNN_leaf=value_...`: the index, then each swept key's last part with its value (file-name safe)."""
        words = [f"{key.split('.')[-1]}={_word(value)}" for key, value in self.overrides.items()]
        words += [] if self.seed is None else [f"seed={self.seed}"]
        slug = re.sub(r"[^A-Za-z0-9._=+-]", "", "_".join(words))[:80]
        return f"{self.index:03d}" + (f"_{slug}" if slug else "")

    def argv(self) -> list[str]:
        """main.py words that apply this point: the dotlist overrides and --seed."""
        return [f"{key}={_word(value)}" for key, value in self.overrides.items()] + (
            [] if self.seed is None else ["-s", str(self.seed)])


def _word(value: Any) -> str:
    """A value as a dotlist word OmegaConf reads back as the same value."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("\n...").strip()


# ---- the sweep file ------------------------------------------------------------------------------------------------
def load_spec(path: str) -> dict[str, Any]:
    """The sweep file as a dict, checked: unknown keys, methods and malformed parameters name the file and key."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file not found: {path}")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot parse sweep file {path}: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping with `parameters` (or `runs`)")
    for key in spec:
        if key not in TOP_KEYS:
            hint = difflib.get_close_matches(key, TOP_KEYS, n=1)
            raise ConfigError(f"sweep file {path}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    method = spec.setdefault("method", "list" if "runs" in spec else "grid")
    if method not in METHODS:
        raise ConfigError(f"sweep file {path}: method {method!r} is not one of {', '.join(METHODS)}")
    if method == "list":
        if not isinstance(spec.get("runs"), list) or not all(isinstance(r, dict) for r in spec["runs"]) or not spec["runs"]:
            raise ConfigError(f"sweep file {path}: method list needs `runs`, a list of {{key: value}} mappings")
        keys = {k for run in spec["runs"] for k in run}
    else:
        if not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
            raise ConfigError(f"sweep file {path}: method {method} needs `parameters`, a mapping of keys to values")
        keys = set(spec["parameters"])
        _check_values(path, method, spec)
    for key in keys:
        if key != "seed" and not cli.is_override(f"{key}=0"):
            raise ConfigError(f"sweep file {path}: {key!r} is not a dotlist key (such as model.params.x)")
    if not isinstance(spec.get("seeds", []), list):
        raise ConfigError(f"sweep file {path}: `seeds` must be a list of integers")
    return spec


def _check_values(path: str, method: str, spec: dict) -> None:
    params = spec["parameters"]
    for key, values in params.items():
        if method == "random" and isinstance(values, dict):
            if not {"low", "high"} <= set(values) or set(values) - {"low", "high", "log", "int"}:
                raise ConfigError(f"sweep file {path}: parameters.{key} must be a list of choices or "
                                  f"{{low, high, log, int}}, got {values}")
        elif not isinstance(values, list) or not values:
            raise ConfigError(f"sweep file {path}: parameters.{key} must be a non-empty list of values")
    if method == "zip" and len({len(v) for v in params.values()}) > 1:
        lengths = ", ".join(f"{k}: {len(v)}" for k, v in params.items())
        raise ConfigError(f"sweep file {path}: method zip needs lists of one length ({lengths})")
    if method == "random" and not (isinstance(spec.get("num_runs"), int) and spec["num_runs"] > 0):
        raise ConfigError(f"sweep file {path}: method random needs num_runs, a positive integer")


def expand(spec: dict[str, Any]) -> list[SweepRun]:
    """The sweep's runs, in a fixed order (random draws are seeded by `random_seed`, default 0)."""
    params, method = spec.get("parameters", {}), spec["method"]
    if method == "grid":
        points = [dict(zip(params, values)) for values in itertools.product(*params.values())]
    elif method == "zip":
        points = [dict(zip(params, values)) for values in zip(*params.values())]
    elif method == "list":
        points = [dict(run) for run in spec["runs"]]
    else:
        rng = random.Random(spec.get("random_seed", 0))
        points = [{key: _draw(rng, values) for key, values in params.items()} for _ in range(spec["num_runs"])]
    runs = []
    for point in points:
        seeds = [point.pop("seed")] if "seed" in point else (spec.get("seeds") or [None])
        for seed in seeds:
            runs.append(SweepRun(len(runs), dict(point), None if seed is None else int(seed)))
    return runs


def _draw(rng: random.Random, values: Any) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    low, high = float(values["low"]), float(values["high"])
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if values.get("log") else rng.uniform(low, high)
    return int(round(x)) if values.get("int") else float(f"{x:.4g}")


# ---- launching -----------------------------------------------------------------------------------------------------
def launch(opt: Any, argv: Sequence[str], now: str, main_dir: str) -> int:
    """Run (or submit) every run of the sweep that has not finished; 0 when none failed."""
    spec = load_spec(opt.sweep)
    name = opt.name or spec.get("name") or os.path.splitext(os.path.basename(opt.sweep))[0]
    sweep_dir = os.path.join(opt.logdir, opt.project, "debug_runs" if opt.debug else "", name)
    runs = expand(spec)
    state = cluster.read_status(os.path.join(sweep_dir, STATE_FILE)) or {"timestamp": now}  # first launch's
    planned = []
    for run in runs:
        child = cli.child_argv(argv, "-l", sweep_dir, "-p", "", "-d", "false", "-n", run.name, *run.argv())
        planned.append((run, child, cli.run_paths(cli.parse_args(child), state["timestamp"]).logdir))
    _save_state(sweep_dir, state, opt.sweep, argv, spec, planned)
    jobs, skipped = [], []
    for run, child, logdir in planned:
        status_file = os.path.join(logdir, RUN_STATUS)
        if cluster.read_status(status_file).get("status") == "finished":
            skipped.append(run.name)
            continue
        cluster.write_status(status_file, "queued", index=run.index, name=run.name, overrides=run.overrides,
                             seed=run.seed, argv=child)
        jobs.append(cluster.MainJob(child, state["timestamp"], main_dir, status_file, os.getcwd()))
    print(f"sweep {sweep_dir}: {len(runs)} runs, {len(skipped)} finished before (skipped), {len(jobs)} to run")
    if not jobs:
        return 0
    folder = os.path.join(sweep_dir, "submitit")
    if opt.slurm:
        return _submit_array(jobs, cluster.parse_slurm(opt.slurm), folder, name)
    return _run_locally(jobs, opt.jobs or 1, folder, name)


def _save_state(sweep_dir: str, state: dict, path: str, argv: Sequence[str], spec: dict, planned: list) -> None:
    """sweep.json: the timestamp of the first launch (it names every run), the command, and each run's folder
    (relative to the sweep folder), overrides and seed."""
    state.update(sweep_file=os.path.abspath(path), command=list(argv), spec=spec,
                 runs=[{"index": run.index, "name": run.name, "dir": os.path.relpath(logdir, sweep_dir),
                        "overrides": run.overrides, "seed": run.seed} for run, _, logdir in planned])
    os.makedirs(sweep_dir, exist_ok=True)
    tmp = os.path.join(sweep_dir, f"{STATE_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(sweep_dir, STATE_FILE))


def _submit_array(jobs: list, spec: dict, folder: str, name: str) -> int:
    """One submitit job array (SLURM); with cluster=local the jobs run here and are waited for."""
    executor = cluster.make_executor(spec, folder, name)
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    print(f"submitted {len(submitted)} jobs ({', '.join(j.job_id for j in submitted)}); logs in {folder}")
    if spec.get("cluster") != "local":
        return 0
    for job, handle in zip(jobs, submitted):
        handle.wait()
        _settle(job, handle)
    return _summary(jobs)


def _run_locally(jobs: list, parallel: int, folder: str, name: str) -> int:
    """Each run in its own local process (submitit's local executor), at most `parallel` at a time."""
    executor = cluster.make_executor({"cluster": "local"}, folder, name)
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            running.append((job, executor.submit(job)))
            print(f"  started: {_run_name(job)} (log {running[-1][1].paths.stdout})", flush=True)
        for pair in [pair for pair in running if pair[1].done()]:
            running.remove(pair)
            _settle(*pair)
        time.sleep(0.5 if running else 0)
    return _summary(jobs)


def _run_name(job: cluster.MainJob) -> str:
    return os.path.basename(os.path.dirname(job.status_file))


def _settle(job: cluster.MainJob, handle: Any) -> None:
    """Print the run's final status; a process that died without writing one is marked failed."""
    if cluster.read_status(job.status_file).get("status") in ("queued", "running"):
        cluster.write_status(job.status_file, "failed", error=f"the job ended without a status; see {handle.paths.stderr}")
    print(f"{cluster.read_status(job.status_file)['status']:>9}: {_run_name(job)}", flush=True)


def _summary(jobs: list) -> int:
    failed = [job for job in jobs if cluster.read_status(job.status_file).get("status") != "finished"]
    print(f"{len(jobs) - len(failed)} of {len(jobs)} runs finished" +
          "".join(f"\n  not finished: {os.path.dirname(job.status_file)}" for job in failed))
    return 1 if failed else 0
