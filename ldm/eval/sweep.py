"""Quality against steps for each sampler (`scripts/sampler_sweep.py`), through scripts/evaluate.py's own runners.

For each run, each sampler (and sigma schedule) and each step count, the run is evaluated as
  class / text / layout models   `evaluate.py --task conditional`: the probe verdict (class: the requested
                                 class; text: colour and shape both right on the seen pairs; layout: the
                                 centre in the requested box), higher is better;
  unconditional models           `evaluate.py --task generation --fid probe`: probe-FID, lower is better;
with the same seeds, sample count and guidance scale for every setting. Writes results.json (every figure and
its evaluate.py record), results.md (a table per run) and results.png (one panel per run, one line per sampler).
"""
import argparse
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

from ldm import sampling_cli
from ldm.diffusion.sampling import DISCRETE_SAMPLERS, SAMPLERS, model_evaluations
from ldm.diffusion.sigma_schedules import SIGMA_SCHEDULES
from ldm.eval import cli as evaluate_cli
from ldm.eval import sweep_report
from ldm.eval.probe import ProbeAccuracyError
from ldm.eval.protocol import machine_description, now_iso
from ldm.sampling_conditions import KINDS

# model kind -> (evaluate.py task, metric key in its record, what it is, higher is better)
METRICS = {
    "class": ("conditional", "class", "probe reads the requested class", True),
    "text": ("conditional", "seen/class_and_color", "colour and shape right (seen pairs)", True),
    "layout": ("conditional", "centre_in_box", "object centre in the requested box", True),
    "unconditional": ("generation", "model/fid", "probe-FID", False),
}
DEFAULT_SAMPLERS = ("ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_a", "unipc")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sampler_sweep.py", allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--run", dest="runs", action="append", nargs="+", required=True,
                   help="run directory of main.py (repeatable)")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(DEFAULT_SAMPLERS))
    p.add_argument("--schedules", nargs="+", choices=SIGMA_SCHEDULES, default=["karras"],
                   help="sigma schedules of the sigma samplers (ddpm/ddim/plms use their own timesteps)")
    p.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--n", type=int, default=200, help="samples per figure (evaluate.py --n)")
    p.add_argument("--scale", type=float, default=1.0, help="guidance scale of conditional runs (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--split", default="validation")
    p.add_argument("--device", help="cuda, cpu, ... (default: the best available)")
    p.add_argument("--probe-cache", help="directory of the cached Shapes probe (default $LDM_CACHE/probe)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, results.png")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    return p


def settings(opt: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(sampler, schedule, steps) to evaluate, in order."""
    out = []
    for sampler in opt.samplers:
        schedules = ["uniform"] if sampler in DISCRETE_SAMPLERS else opt.schedules
        out += [(sampler, schedule, steps) for schedule in schedules for steps in opt.steps]
    return out


def evaluate_argv(opt: argparse.Namespace, run: str, task: str, sampler: str, schedule: str, steps: int,
                  scale: float) -> list[str]:
    """The scripts/evaluate.py command line of one figure."""
    argv = ["--run", run, "--task", task, "--out", os.devnull, "--n", str(opt.n), "--seed", str(opt.seed),
            "--batch_size", str(opt.batch_size), "--split", opt.split, "--sampler", sampler, "--steps", str(steps),
            "--scale", str(scale)]
    argv += [] if sampler in DISCRETE_SAMPLERS else ["--schedule", schedule]
    argv += ["--fid", "probe"] if task == "generation" else []
    argv += ["--device", opt.device] if opt.device else []
    argv += ["--probe-cache", opt.probe_cache] if opt.probe_cache else []
    return argv + list(opt.overrides)


def sweep_run(opt: argparse.Namespace, run: str, done: dict[tuple, dict]) -> Iterator[dict[str, Any]]:
    """Every setting of one run, yielding the run's record after each figure; figures already in `done` (same
    run, setting, n, seed, scale) are reused."""
    first = evaluate_cli.parse_args(evaluate_argv(opt, run, "conditional", "ddim", "uniform", 1, 1.0))
    loaded = sampling_cli.load(first)
    if loaded.kind not in METRICS:
        raise sampling_cli.SamplingError(f"--run {run}: {KINDS[loaded.kind][1]}; the sweep measures class, text, "
                                         f"layout and unconditional Shapes models")
    task, key, label, higher = METRICS[loaded.kind]
    scale = opt.scale if task == "conditional" else 1.0
    record = {"run": run, "name": os.path.basename(os.path.normpath(run)), "kind": loaded.kind, "task": task,
              "metric": key, "metric_label": label, "higher_is_better": higher, "guidance_scale": scale,
              "results": []}
    for sampler, schedule, steps in settings(opt):
        ident = (run, sampler, schedule, steps, opt.n, opt.seed, scale)
        if ident not in done:
            eval_opt = evaluate_cli.parse_args(evaluate_argv(opt, run, task, sampler, schedule, steps, scale))
            start = time.perf_counter()
            protocol = evaluate_cli.RUNNERS[task](eval_opt, loaded)
            seconds = time.perf_counter() - start
            done[ident] = {"sampler": sampler, "schedule": schedule if sampler not in DISCRETE_SAMPLERS else "",
                           "steps": steps, "nfe": model_evaluations(sampler, steps, loaded.model.num_timesteps),
                           "value": protocol.metrics[key], "seconds": round(seconds, 2),
                           "metrics": protocol.metrics, "eta": protocol.eta, "num_samples": protocol.num_samples}
            print(f"{record['name']}: {sampler} {schedule} {steps} steps: {key} = {protocol.metrics[key]:.4g} "
                  f"({seconds:.1f} s)", file=sys.stderr, flush=True)
        record["results"].append(done[ident])
        yield record


def previous_results(path: str) -> dict[tuple, dict]:
    """Figures of an earlier (interrupted) sweep into the same folder, by run and setting."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    p = data.get("protocol", {})
    return {(run["run"], r["sampler"], r["schedule"] or "uniform", r["steps"], p.get("n"), p.get("seed"),
             run["guidance_scale"]): r for run in data.get("runs", []) for r in run["results"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    opt = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    opt.runs = [r for group in opt.runs for r in group]
    if opt.n < 1 or any(k < 1 for k in opt.steps):
        parser.error(f"--n and --steps must be positive, got {opt.n} and {opt.steps}")
    os.makedirs(opt.out, exist_ok=True)
    done = previous_results(os.path.join(opt.out, "results.json"))
    protocol = {"n": opt.n, "seed": opt.seed, "scale_of_conditional_runs": opt.scale, "steps": opt.steps,
                "samplers": opt.samplers, "schedules": opt.schedules, "split": opt.split, "batch_size": opt.batch_size,
                "overrides": list(opt.overrides), "date": now_iso(), "machine": machine_description(),
                "seeds": "sample i of every setting starts from noise seeded with seed + i"}
    runs: list[dict[str, Any]] = []
    try:
        for run in opt.runs:
            runs.append({})
            for record in sweep_run(opt, run, done):
                runs[-1] = record
                sweep_report.write_json(opt.out, protocol, runs)
    except (*sampling_cli.USER_ERRORS, ProbeAccuracyError) as err:
        print(f"sampler_sweep.py: error: {err}", file=sys.stderr)
        return 2
    paths = sweep_report.write_all(opt.out, protocol, runs)
    print(f"sampler_sweep.py: {sum(len(r['results']) for r in runs)} figures; " + ", ".join(paths))
    return 0
