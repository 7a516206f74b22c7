"""`scripts/sweep_report.py SWEEP_DIR`: each run's final metrics against its swept values, as a CSV and a plot.

Metrics are the last logged value of every scalar, read from the run's TensorBoard events (`tensorboard/`) or
CSVLogger file (`csv/metrics.csv`). Runs that did not finish are listed, with their status, in the CSV, on the
plot and on stdout.
"""
import csv
import glob
import os
from typing import Any

from ldm.cluster import read_status
from ldm.sweep import RUN_STATUS, STATE_FILE


def final_metrics(logdir: str) -> dict[str, float]:
    """tag -> its value at the largest logged step (TensorBoard events, else csv/metrics.csv); {} when none."""
    events = sorted(glob.glob(os.path.join(logdir, "tensorboard", "events.out.tfevents.*")))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        metrics: dict[str, tuple[int, float]] = {}
        for path in events:  # a continued run writes a second events file
            acc = EventAccumulator(path, size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                last = max(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time))
                if tag != "hp_metric" and (tag not in metrics or last.step >= metrics[tag][0]):
                    metrics[tag] = (last.step, float(last.value))
        return {tag: value for tag, (_, value) in sorted(metrics.items())}
    path = os.path.join(logdir, "csv", "metrics.csv")
    if not os.path.isfile(path):
        return {}
    out: dict[str, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")})
    return dict(sorted(out.items()))


def collect(sweep_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run of `sweep_dir/sweep.json` (name, status, attempts, seed, swept values, final metrics) and
    the swept keys."""
    state_file = os.path.join(sweep_dir, STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder: no {STATE_FILE} (made by main.py --sweep)")
    state = read_status(state_file)
    keys = list(dict.fromkeys(k for run in state["runs"] for k in run["overrides"]))
    if any(run["seed"] is not None for run in state["runs"]):
        keys.append("seed")
    rows = []
    for run in state["runs"]:
        logdir = os.path.join(sweep_dir, run["dir"])
        record = read_status(os.path.join(logdir, RUN_STATUS))
        rows.append({"run": run["name"], "status": record.get("status", "not started"),
                     "attempts": record.get("attempts", 0), **run["overrides"], "seed": run["seed"],
                     **final_metrics(logdir)})
    return rows, keys


def sweep_metric(sweep_dir: str) -> str | None:
    """The `metric` of the sweep file, if it names one."""
    return (read_status(os.path.join(sweep_dir, STATE_FILE)).get("spec") or {}).get("metric")


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def choose_metric(rows: list[dict[str, Any]], keys: list[str], requested: str | None) -> str:
    """`requested`, else val/loss, else the first val/ metric, else the first metric of the finished runs."""
    fixed = set(keys) | {"run", "status", "attempts", "seed"}
    names = [k for row in rows if row["status"] == "finished" for k in row if k not in fixed]
    if requested:
        if requested not in names:
            raise KeyError(f"metric {requested!r} was not logged by a finished run; logged: {sorted(set(names))}")
        return requested
    for candidate in ["val/loss", *[n for n in names if n.startswith("val/")], *names]:
        if candidate in names:
            return candidate
    raise KeyError("no finished run logged a metric")


def plot(rows: list[dict[str, Any]], keys: list[str], metric: str, path: str, title: str) -> None:
    """One panel per swept key: the metric of each finished run against its value; unfinished runs listed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [row for row in rows if row["status"] == "finished" and metric in row]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [row.get(key) for row in done]
        numeric = key != "seed" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            x = values
            positive = values and min(values) > 0
            if positive and max(values) / min(values) >= 20:
                ax.set_xscale("log")
        else:  # categories in order of first appearance
            labels = list(dict.fromkeys(str(v) for v in values))
            x = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        for seed in dict.fromkeys(row.get("seed") for row in done):  # one colour per seed
            mine = [i for i, row in enumerate(done) if row.get("seed") == seed]
            ax.scatter([x[i] for i in mine], [done[i][metric] for i in mine], color=_seed_colour(seed), s=30,
                       label=f"seed {seed}" if seed is not None else "default seed")
        ax.set_xlabel(key.split(".")[-1] if key != "seed" else "seed", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    if done:
        axes[0][0].legend(fontsize=7)
    failed = [f"{row['run']} ({row['status']})" for row in rows if row["status"] != "finished"]
    fig.suptitle(title + ("\nnot finished: " + ", ".join(failed) if failed else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seed_colour(seed: Any) -> str:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    return palette[seed % len(palette)] if isinstance(seed, int) else "tab:grey"
