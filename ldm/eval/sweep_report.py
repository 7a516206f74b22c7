"""The sampler sweep's outputs (ldm.eval.sweep): results.json, a Markdown table per run (results.md) and a plot of
quality against steps, one panel per run and one line per sampler (results.png)."""
import json
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def line_name(result: dict[str, Any], schedules: Sequence[str]) -> str:
    """A sampler's name, with its sigma schedule when the sweep ran more than one."""
    if result["schedule"] and len(schedules) > 1:
        return f"{result['sampler']} ({result['schedule']})"
    return result["sampler"]


def lines(run: dict[str, Any], schedules: Sequence[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """line name -> steps -> result, in the order the sweep ran them."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in run["results"]:
        out.setdefault(line_name(r, schedules), {})[r["steps"]] = r
    return out


def write_json(folder: str, protocol: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    path = os.path.join(folder, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"protocol": protocol, "runs": [r for r in runs if r]}, f, indent=1)
    os.replace(tmp, path)
    return path


def markdown(protocol: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    """One table per run: a row per sampler, a column per step count; model evaluations in brackets where they
    differ from the steps (Heun, DPM++ 2S a: two per step)."""
    steps = list(protocol["steps"])
    parts = [f"Sampler sweep: {protocol['n']} samples per figure, seed {protocol['seed']}, {protocol['date']}, "
             f"{protocol['machine']}.\n"]
    for run in runs:
        if not run:
            continue
        better = "higher" if run["higher_is_better"] else "lower"
        parts.append(f"\n### {run['name']} ({run['kind']}): {run['metric_label']}, {better} is better"
                     + (f", guidance scale {run['guidance_scale']:g}" if run["task"] == "conditional" else "") + "\n")
        parts.append("| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |")
        parts.append("|---|" + "---|" * len(steps))
        for name, by_steps in lines(run, protocol["schedules"]).items():
            cells = [_cell(by_steps.get(k), run) for k in steps]
            parts.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append(_claim(run, protocol["schedules"]))
    return "\n".join(p for p in parts if p is not None) + "\n"


def _cell(result: dict[str, Any] | None, run: dict[str, Any]) -> str:
    if result is None:
        return "–"
    v = result["value"]
    value = f"{100 * v:.1f}%" if run["higher_is_better"] else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return value + (f" ({result['nfe']} NFE)" if result["nfe"] != result["steps"] else "")


def _claim(run: dict[str, Any], schedules: Sequence[str]) -> str | None:
    """DPM++ 2M at 20 steps beside DDIM at 50, when both were measured."""
    by_line = lines(run, schedules)
    ddim = by_line.get("ddim", {}).get(50)
    dpm = next((v.get(20) for k, v in by_line.items() if k.startswith("dpmpp_2m") and "sde" not in k), None)
    if ddim is None or dpm is None:
        return None
    ok = dpm["value"] >= ddim["value"] if run["higher_is_better"] else dpm["value"] <= ddim["value"]
    return (f"\nDPM++ 2M at 20 steps: {dpm['value']:.4g}; DDIM at 50 steps: {ddim['value']:.4g} "
            f"({'at least as good' if ok else 'worse'}).\n")


def plot(path: str, protocol: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    runs = [r for r in runs if r]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for name, by_steps in lines(run, protocol["schedules"]).items():
            ks = sorted(by_steps)
            values = [by_steps[k]["value"] * (100 if run["higher_is_better"] else 1) for k in ks]
            ax.plot(ks, values, marker="o", markersize=3, label=name)
        ax.set_xscale("log")
        ax.set_xticks(protocol["steps"], [str(k) for k in protocol["steps"]])
        ax.minorticks_off()
        ax.set_xlabel("steps")
        unit = " (%)" if run["higher_is_better"] else ""
        ax.set_ylabel(f"{run['metric_label']}{unit}, {'higher' if run['higher_is_better'] else 'lower'} is better",
                      fontsize=8)
        ax.set_title(f"{run['name']} ({run['kind']})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(folder: str, protocol: dict[str, Any], runs: Sequence[dict[str, Any]]) -> list[str]:
    """results.json, results.md, results.png in `folder`; their paths."""
    md = os.path.join(folder, "results.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(protocol, runs))
    return [write_json(folder, protocol, runs), md, plot(os.path.join(folder, "results.png"), protocol, runs)]
