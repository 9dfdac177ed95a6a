"""Every console script runs from any directory: the paper's configs ship in the package
(ivfast/configs; the repository's configs/ links there) and are found by name."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from ivfast.config import CONFIG_DIR, ConfigError, load_config, packaged_configs, resolve_config_path
from tests.support import ROOT, run_env

BIN = os.path.dirname(sys.executable)


def cli(tmp_path, name, *args, timeout=300):
    """Run the console script ``name`` with the working directory ``tmp_path`` (outside the repository)."""
    exe = os.path.join(BIN, name)
    assert os.path.exists(exe), f"{exe} is missing: install ivfast (make install)"
    env = run_env()
    env.pop("PYTHONPATH", None)  # ivfast as installed, not from a path pointing at the repository
    return subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_repository_configs_path_is_the_packaged_folder():
    assert os.path.islink(os.path.join(ROOT, "configs"))
    assert os.path.samefile(os.path.join(ROOT, "configs"), os.path.join(ROOT, "ivfast", "configs"))
    assert os.path.samefile(CONFIG_DIR, os.path.join(ROOT, "ivfast", "configs"))
    names = packaged_configs()
    assert {"tiny", "stage1_b_align", "stage1_b_diffusion", "stage2_b", "probes/probe_classify_ssv2"} <= set(names)


@pytest.mark.parametrize("name, file", [
    ("stage1_b_diffusion", "stage1_b_diffusion.yaml"),
    ("stage1_b_diffusion.yaml", "stage1_b_diffusion.yaml"),
    ("configs/stage1_b_align.yaml", "stage1_b_align.yaml"),
    ("probes/probe_classify_ssv2.yaml", os.path.join("probes", "probe_classify_ssv2.yaml")),
    ("configs/probes/probe_depth_tiny", os.path.join("probes", "probe_depth_tiny.yaml")),
])
def test_names_resolve_to_packaged_files_outside_the_repository(tmp_path, monkeypatch, name, file):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(name) == os.path.join(CONFIG_DIR, file)


def test_a_path_that_exists_wins_and_base_falls_back_to_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # tiny.yaml here is the user's own file; its base is not beside it: the packaged stage1_b_diffusion.
    (tmp_path / "tiny.yaml").write_text("base: stage1_b_diffusion.yaml\noutput_dir: runs/mine\n")
    cfg = load_config("tiny.yaml")
    assert cfg.output_dir == "runs/mine" and cfg.model.encoder.width == 768
    assert resolve_config_path("tiny.yaml") == "tiny.yaml"
    assert load_config("tiny").model.encoder.width == 64  # no file "tiny" here: the packaged one
    (tmp_path / "linear.yaml").write_text("base: stage1_b_linear\n")
    assert load_config("linear.yaml").model.recon == "linear"  # the packaged chain goes on beside its file


def test_an_unknown_name_lists_the_packaged_ones_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("stage1_b_difusion", "../configs/tiny.yaml", str(tmp_path / "missing.yaml")):
        with pytest.raises(ConfigError) as e:
            load_config(bad)
        text = str(e.value)
        assert "\n" not in text and text.startswith(f"config error: config file not found: {bad} ")
        assert "stage1_b_diffusion, " in text and "probes/probe_classify_ssv2" in text
    (tmp_path / "mine.yaml").write_text("base: nothing_like_it.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nothing_like_it.yaml .*tiny"):
        load_config("mine.yaml")


def test_ivfast_train_by_name(tmp_path):
    ok(cli(tmp_path, "ivfast-train", "--config", "tiny", "train.max_steps=2", "train.save_every=2",
           "train.progress=false", "data.num_workers=0", "output_dir=run"))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records][-1] == 2
    assert (tmp_path / "run" / "config.yaml").exists()


def test_ivfast_train_unknown_name_is_one_line(tmp_path):
    proc = cli(tmp_path, "ivfast-train", "--config", "tinyy")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config file not found: tinyy" in lines[0] and "stage1_b_diffusion" in lines[0]


def test_ivfast_memory_report_default_rows(tmp_path):
    proc = ok(cli(tmp_path, "ivfast-memory", "report", "--out", "mem"))
    assert "Align + Diffusion Recon" in proc.stdout
    assert (tmp_path / "mem" / "memory_report.md").exists()


def test_ivfast_probe_by_name(tmp_path):
    proc = ok(cli(tmp_path, "ivfast-probe", "classify", "--config", "probes/probe_classify_tiny", "max_steps=2",
                  "save_every=2", "output_dir=probe"))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 2
    assert (tmp_path / "probe" / "results.json").exists()


@pytest.mark.parametrize("name", ["ivfast-data", "ivfast-export", "ivfast-plot", "ivfast-extract"])
def test_help(tmp_path, name):
    proc = ok(cli(tmp_path, name, "--help", timeout=120))
    assert proc.stdout.startswith("usage:")


def test_the_wheel_carries_the_configs(tmp_path):
    """A regular (non-editable) install has the configs: they are in the wheel, as package data."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("setup.py", "requirements.txt", "requirements-dev.txt", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    shutil.copytree(os.path.join(ROOT, "ivfast"), src / "ivfast", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("ivfast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"ivfast/configs/{n}.yaml" for n in packaged_configs()}
    assert want <= names, sorted(want - names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "extra ==" not in r and ("dali" in r or "pytest" in r)]  # not runtime
    assert "Provides-Extra: gpu" in meta and "Provides-Extra: test" in meta
    assert "Requires-Dist: nvidia-dali-cuda130==2.4.0; extra == \"gpu\"" in meta
    assert "Requires-Dist: pytest==9.2.0; extra == \"test\"" in meta
