"""``bash benchmarks/gpu_check.sh --dry-run``: on the CPU, every command of every part of the GPU
check resolves, every import works and the carried files fit in 64 MiB; a command that does not
resolve, or budgets over the total, fail it."""
import os
import re
import subprocess
import sys

from tests.support import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
PARTS = ("setup", "tests", "zero2", "step", "memory", "bench")


def _dry_run(**env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k not in ("OUT", "PY")}
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env={**clean, "PY": sys.executable, **env},
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    summary = {}
    if "== dry-run summary" in out:
        for line in out.split("== dry-run summary", 1)[1].splitlines()[2:]:
            m = re.match(r"^(\w+)\s+(ok|FAILED)\s+[\d.]+\s+(.*)$", line)
            if m:
                summary[m.group(1)] = (m.group(2), m.group(3))
    return proc.returncode, out, summary


def test_dry_run_resolves_every_part_and_the_carry_fits():
    results = os.path.join(ROOT, "benchmarks", "results")
    before = sorted(os.listdir(results))
    rc, out, summary = _dry_run()
    assert rc == 0, out[-4000:]
    assert out.rstrip().endswith("gpu_check --dry-run: all resolve"), out[-2000:]
    assert list(summary) == [*PARTS, "imports", "carry", "budget"], out[-3000:]
    assert all(status == "ok" for status, _ in summary.values()), summary
    tests = [int(n) for n in re.findall(r"collected (\d+) tests", summary["tests"][1])]
    assert len(tests) == 2 and all(n > 0 for n in tests), summary["tests"]  # tests/ops; kernels-marked model tests
    assert "6 of 6 resolve" in summary["step"][1]  # ViT-B rows 1-3, two ways
    assert "collected" in summary["bench"][1] and "rmsnorm 2/3" in summary["bench"][1], summary["bench"]
    assert "gpu-only flash_attn" in summary["imports"][1] and "needs the GPU machine's wheels" in summary["imports"][1]
    carry = re.search(r"= ([\d.]+) MiB of 64 MiB", summary["carry"][1])
    assert carry and float(carry.group(1)) <= 64, summary["carry"]
    budget = re.search(r": (\d+) s of the (\d+) s total", summary["budget"][1])
    assert budget and int(budget.group(1)) <= int(budget.group(2)) <= 480, summary["budget"]
    assert sorted(os.listdir(results)) == before  # the dry run writes no result


def test_dry_run_fails_on_a_missing_config_and_on_budgets_over_the_total():
    rc, out, summary = _dry_run(GPU_CHECK_PARTS="step", GPU_CHECK_STEP_CONFIGS="configs/no_such_config.yaml",
                                GPU_CHECK_T_STEP="500")
    assert rc == 1, out[-3000:]
    assert out.rstrip().endswith("gpu_check --dry-run: FAILED")
    assert summary["step"][0] == "FAILED" and "no_such_config" in summary["step"][1], summary.get("step")
    assert summary["budget"][0] == "FAILED" and summary["setup"][0] == "ok", summary
