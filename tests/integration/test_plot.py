"""ivfast-plot: PNGs of runs' metrics, several runs overlaid with one legend entry each."""
import json
import os
import subprocess
import sys

from ivfast.plot import FIGURES, main, make_figures, read_metrics, run_names
from tests.support import ROOT
from tests.training.watched_run import watched_run

PNG = b"\x89PNG\r\n\x1a\n"


def _two_runs(tmp_path):
    """The watched tiny run and a second one (its records scaled, a resumed step logged twice)."""
    first = watched_run()
    second = tmp_path / "second"
    second.mkdir()
    recs = read_metrics(first)
    with open(second / "metrics.jsonl", "w") as f:
        for r in recs + recs[-1:]:
            f.write(json.dumps({**r, "loss": 0.5 * r["loss"], "clips_per_s": 2 * r["clips_per_s"]}) + "\n")
    return [first, str(second)]


def test_figures_overlay_the_runs_with_one_legend_entry_each(tmp_path):
    import matplotlib.pyplot as plt

    paths = _two_runs(tmp_path)
    names = run_names(paths)
    assert names == ["watched", "second"]
    runs = {n: read_metrics(p) for n, p in zip(names, paths)}
    assert [r["step"] for r in runs["second"]] == [r["step"] for r in runs["watched"]]  # a step once
    figures = make_figures(runs)
    assert set(figures) == set(FIGURES)
    for stem, fig in figures.items():
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == names, stem
        plt.close(fig)


def test_the_cli_writes_valid_pngs(tmp_path):
    paths = _two_runs(tmp_path)
    out = tmp_path / "plots"
    assert main([*paths, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(f"{stem}.png" for stem in FIGURES)
    for name in os.listdir(out):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name


def test_python_dash_m_runs_it_and_a_missing_run_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "ivfast.plot", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(run / "plots")) == ["loss.png", "lr.png"]
    proc = subprocess.run([sys.executable, "-m", "ivfast.plot", str(tmp_path / "nothing")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no metrics.jsonl" in proc.stderr
