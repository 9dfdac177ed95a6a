"""``ivfast-memory report`` writes the Markdown report and the PNG chart."""
import pytest
import torch

from ivfast.memory import cli


def test_default_rows(tmp_path, capsys):
    assert cli.main(["report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "memory_report.md").read_text()
    png = (tmp_path / "memory_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for name, paper in (("Align only", "22.0"), ("Align + Linear Recon", "41.0"), ("Align + Diffusion Recon", "48.0")):
        line = next(l for l in md.splitlines() if l.startswith(f"| {name} |"))
        assert f"| {paper} |" in line
    assert "## Assumptions" in md and "activations: diffusion head" in md
    assert "release's way" in capsys.readouterr().out


def test_any_config(tmp_path):
    assert cli.main(["report", "--config", "configs/tiny.yaml", "--zero", "2", "--world", "4",
                     "--out", str(tmp_path)]) == 0
    md = (tmp_path / "memory_report.md").read_text()
    assert "| tiny | - |" in md and "ZeRO stage 2, world size 4" in md
    assert (tmp_path / "memory_report.png").stat().st_size > 1000


def test_bad_config_is_one_line(tmp_path, capsys):
    assert cli.main(["report", "--config", "nope.yaml", "--out", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_measure_needs_a_gpu(tmp_path, capsys):
    assert cli.main(["report", "--measure", "--config", "configs/tiny.yaml", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
