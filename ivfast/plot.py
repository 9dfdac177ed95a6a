"""Plot runs' metrics.jsonl: loss components, lr, throughput, data share and memory against the step.

    ivfast-plot RUN_DIR [RUN_DIR ...] [--out DIR]
    python -m ivfast.plot runs/tiny runs/tiny_b --out plots

Writes ``loss.png``, ``lr.png`` (and the gradient norm), ``throughput.png`` (clips/s, tokens/s,
TFLOP/s, MFU), ``data_share.png`` and ``memory.png`` to ``--out`` (default ``RUN_DIR/plots`` for
one run, ``./plots`` for several). Several runs are overlaid, one colour each, named in the legend
by their directory. A RUN_DIR may also be a metrics.jsonl file. A step logged twice (a resumed run
logs the steps after its checkpoint again) keeps its last record. Needs only matplotlib (Agg).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# One figure per file: its panels, each (title, [record fields]) ; a panel whose fields no run has is left out.
FIGURES = {
    "loss": [("loss", ["loss"]), ("alignment", ["loss_align_layers", "loss_align_final"]),
             ("reconstruction", ["loss_recon"]), ("diffusion terms", ["diff_mse", "diff_vb"]),
             ("views (Stage 2)", ["loss_view0", "loss_view1"])],
    "lr": [("learning rate", ["lr"]), ("gradient norm", ["grad_norm", "grad_norm_max"])],
    "throughput": [("clips/s (all ranks)", ["clips_per_s"]), ("tokens/s (all ranks)", ["tokens_per_s"]),
                   ("TFLOP/s per device", ["tflops"]), ("MFU", ["mfu"])],
    "data_share": [("data share of the step time", ["data_share"]), ("step time (s)", ["step_time", "data_time"])],
    "memory": [("peak memory (MiB)", ["peak_mem_mb", "peak_reserved_mb"]), ("peak per phase (MiB)", None)],
}
STYLES = ["-", "--", ":", "-."]


def read_metrics(path: str) -> list[dict]:
    """The records of a run directory's metrics.jsonl (or of that file), one per step, in order."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    by_step: dict = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(rec, dict) and "step" in rec:
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def run_names(paths: list[str]) -> list[str]:
    """Each run's legend name: its directory's name, or the path as given where names repeat."""
    dirs = [os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths]
    names = [os.path.basename(os.path.abspath(d)) for d in dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, dirs)]


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _series(records: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        y = _number(r.get(key))
        if y is not None:
            xs.append(r["step"])
            ys.append(100 * y if key == "mfu" else y)
    return xs, ys


def _phase_keys(runs: dict) -> list[str]:
    keys = {k for recs in runs.values() for r in recs for k in r if k.startswith("mem_") and k.endswith("_mb")}
    return sorted(keys)


def make_figures(runs: dict[str, list[dict]]) -> dict:
    """``{file stem: matplotlib Figure}`` for the runs ``{name: records}``; each figure has one
    legend entry per run that has any of its fields."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    figures = {}
    for stem, panels in FIGURES.items():
        panels = [(title, keys if keys is not None else _phase_keys(runs)) for title, keys in panels]
        panels = [(t, ks) for t, ks in panels if any(_series(recs, k)[0] for recs in runs.values() for k in ks)]
        if not panels:
            continue
        cols = min(2, len(panels))
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
        handles = {}
        for ax, (title, keys) in zip(axes.flat, panels):
            for name, recs in runs.items():
                for j, key in enumerate(keys):
                    xs, ys = _series(recs, key)
                    if not xs:
                        continue
                    (line,) = ax.plot(xs, ys, STYLES[j % len(STYLES)], color=colours[name], linewidth=1.2)
                    handles.setdefault(name, line)
            ax.set_title(title + (" (%)" if keys == ["mfu"] else ""))
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(keys) > 1:  # which line style is which field
                ax.text(0.99, 0.98, "  ".join(f"{STYLES[j % len(STYLES)]} {k}" for j, k in enumerate(keys)),
                        transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.35")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        names = [n for n in runs if n in handles]
        fig.legend([handles[n] for n in names], names, loc="upper center", ncol=min(4, len(names)),
                   frameon=False, bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        figures[stem] = fig
    return figures


def plot_runs(paths: list[str], out_dir: str) -> list[str]:
    """Write the PNGs of the runs at ``paths`` into ``out_dir``; returns their paths."""
    runs = {name: read_metrics(p) for name, p in zip(run_names(paths), paths)}
    figures = make_figures(runs)
    import matplotlib.pyplot as plt  # after make_figures chose Agg

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, fig in figures.items():
        path = os.path.join(out_dir, f"{stem}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ivfast-plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default=None,
                   help="output folder (default: RUN_DIR/plots for one run, ./plots for several)")
    args = p.parse_args(argv)
    for path in args.runs:
        if not os.path.isfile(os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path):
            print(f"ivfast-plot: no metrics.jsonl in {path}", file=sys.stderr)
            return 2
    out = args.out or (os.path.join(args.runs[0], "plots") if len(args.runs) == 1 and os.path.isdir(args.runs[0])
                       else "plots")
    for path in plot_runs(args.runs, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
