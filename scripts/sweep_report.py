"""Each run of a sweep (main.py --sweep) with its swept values and final metrics: a CSV and a plot.

    python scripts/sweep_report.py logs/<sweep name> [--metric val/loss_simple_ema] [--csv out.csv] [--plot out.png]

Writes `<SWEEP_DIR>/report.csv` (one row per run: name, status, attempts, swept values, seed, the last value of
every logged scalar) and `<SWEEP_DIR>/report.png` (the metric against each swept key; colours: seeds), and lists
the runs that did not finish. Exit status 2 when SWEEP_DIR is not a sweep folder or the metric was not logged.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm import sweep_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="the sweep's folder (<logdir>/<sweep name>, holding sweep.json)")
    p.add_argument("--metric", help="metric to plot (default: the sweep file's `metric`, val/loss, a val/ metric)")
    p.add_argument("--csv", help="CSV path (default: SWEEP_DIR/report.csv)")
    p.add_argument("--plot", help="plot path (default: SWEEP_DIR/report.png)")
    opt = p.parse_args(argv)
    try:
        rows, keys = sweep_report.collect(opt.sweep_dir)
        metric = sweep_report.choose_metric(rows, keys, opt.metric or sweep_report.sweep_metric(opt.sweep_dir))
    except (FileNotFoundError, KeyError) as err:
        print(f"sweep_report.py: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    csv_path = opt.csv or os.path.join(opt.sweep_dir, "report.csv")
    plot_path = opt.plot or os.path.join(opt.sweep_dir, "report.png")
    sweep_report.write_csv(rows, csv_path)
    sweep_report.plot(rows, keys, metric, plot_path, f"{os.path.basename(os.path.normpath(opt.sweep_dir))}: {metric}")
    finished = [row for row in rows if row["status"] == "finished"]
    print(f"{len(finished)} of {len(rows)} runs finished; {metric} of each run and the swept values in {csv_path}, "
          f"plot {plot_path}")
    for row in rows:
        if row["status"] != "finished":
            print(f"  not finished: {row['run']} ({row['status']}, {row['attempts']} attempt(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
