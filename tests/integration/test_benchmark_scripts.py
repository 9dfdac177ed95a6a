"""The benchmark scripts run (at tiny sizes on the CPU), so they are ready for a GPU."""
import os

import pytest

from tests.support import ROOT


def test_profile_step_runs_on_the_tiny_config(capsys):
    from benchmarks.profile_step import main

    assert main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "aten::" in out and " ms " in out


@pytest.mark.kernels
def test_step_benchmark_runs_both_ways_and_the_release_way_runs_no_triton_kernel(capsys, monkeypatch):
    """benchmarks/step.py runs here at a tiny size: the release's way and ivfast's, each row with
    throughput, a FLOP count and a step-time split summing to 100 %. Every Triton launch goes
    through the interpreter here and is counted: the release's way (``RELEASE_WAY``, the list the
    memory model uses too) launches none, ivfast's way launches the fused kernels."""
    from triton.runtime.interpreter import InterpretedFunction

    from benchmarks.step import WAYS, main
    from ivfast.config import RELEASE_WAY
    from tests.support import RENDEZVOUS_VARS

    for var in sorted(RENDEZVOUS_VARS | {"DS_ACCELERATOR"}):
        monkeypatch.setenv(var, "")  # records the value before, so teardown undoes what the run sets
        monkeypatch.delenv(var)
    assert WAYS["release"] is RELEASE_WAY and WAYS["ivfast"] == []
    launched = []
    run = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting)
    rows, kernels = [], {}
    for way in ("release", "ivfast"):
        launched.clear()
        assert main(["--configs", "configs/tiny.yaml", "--ways", way, "--steps", "1", "--warmup", "1"]) == 0
        kernels[way] = set(launched)
        rows += [dict(kv.split("=", 1) for kv in line.split()) for line in capsys.readouterr().out.splitlines()
                 if line.startswith("config=")]
    assert kernels["release"] == set()
    assert {"_q_sample_kernel", "_eps_mse_fwd_kernel", "_add_pos_fwd_kernel", "_scatter_fwd_kernel",
            "_rms_fwd_kernel", "_timestep_kernel", "_ln_mod_fwd_kernel"} <= kernels["ivfast"], kernels["ivfast"]
    assert [r["way"] for r in rows] == ["release", "ivfast"]
    for r in rows:
        assert float(r["clips_per_s"]) > 0 and float(r["tflops_per_step"]) > 0
        split = [float(r[f"{p}_pct"]) for p in ("data", "teacher", "student_forward", "backward", "optimizer")]
        assert abs(sum(split) - 100) < 0.5


def test_peak_tflops_lookup():
    from ivfast.training.flops import peak_tflops  # what benchmarks/step.py reports MFU against

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


def test_gpu_check_script_parses():
    import subprocess

    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], check=True)
