"""The Python half of ``benchmarks/gpu_check.sh``: ``resolve`` (its ``--dry-run``) and ``report``.

    python benchmarks/gpu_check.py resolve COMMANDS WHEELS BUDGETS BUDGET_SUM TOTAL
    python benchmarks/gpu_check.py report LOGDIR START TOTAL

``resolve`` takes the commands that every part of the check would run (recorded by the script's
``x`` function: part, tab, the arguments each ended by \\x1f, the command ended by \\x1e) and checks each on the CPU
without doing the work: the interpreter and every ``-m`` module or script path exist; pytest
commands collect (``--collect-only``: paths, flags, ``-m`` / ``-k`` expressions, every test
module's imports); argparse programs parse their arguments (``parse_args`` is stopped once it
succeeds, after the program's own imports ran) and the config files they name load with their
overrides; a program with its own ``--dry-run`` (benchmarks/step.py) runs it; ``-c`` code
compiles; the wheels a ``pip install`` names are wheels for the GPU machine's Python 3.12 on
x86-64. Then: every module the parts import lazily imports here, the GPU-only ones (flash-attn,
DALI) are reported as needing the GPU machine's wheels, every third-party distribution imported
is in the GPU image or carried in .whl/, the carried files (the working tree's tracked and
untracked-not-ignored files, plus .whl/ as measured, or as listed in gpu_wheels.sh when absent)
fit in 64 MiB, and the time budgets fit the total. Prints one summary line per part; exit 1 if
anything does not resolve.

``report`` writes, after a real run, ``gpu_check-<device>-<date>.{json,md}`` (every part's status,
seconds, limit and what it reported), ``memory_measure-...`` (row 3's modelled and measured GiB)
and, when the step part did not finish, ``step_partial-...`` (the rows it printed) through
``benchmarks/harness.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import runpy
import subprocess
import sys
import time
import warnings
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY_LIMIT = 64 * 2**20  # the device tool: the working tree plus carried paths, 64 MiB a call
DEVICE_COMMAND_LIMIT_S = 600  # the device tool: one command runs at most 10 minutes

# Python packages in the GPU machines' image (the device tool's KINDS.md, read 2026-11-17).
GPU_IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
GPU_IMAGE_VERSIONS = "torch 2.11.0, triton 3.6.0 (KINDS.md), not the pinned torch 2.13.0 / triton 3.7.1"

# What the parts import lazily (inside functions), beyond what their commands import at start.
LAZY_IMPORTS = ("torch", "triton", "triton.testing", "numpy", "yaml", "einops", "safetensors", "tqdm", "matplotlib",
                "deepspeed", "pytest", "pytest_benchmark", "ivfast.train", "ivfast.training.trainer",
                "ivfast.training.engine", "ivfast.training.step", "ivfast.training.phase_tracker",
                "ivfast.data.loader", "ivfast.memory.cli", "ivfast.memory.report", "ivfast.memory.analytic",
                "ivfast.rng", "benchmarks.harness", "benchmarks.step")
GPU_ONLY = {"flash_attn": "flash-attn (the flash attention rows)", "nvidia.dali": "DALI (the DALI loader)"}
LOCAL = {"ivfast", "benchmarks", "tests", "tools", "__main__", "__mp_main__"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------------- resolve
class _Parsed(BaseException):
    """Raised by the patched ``ArgumentParser.parse_args`` once the arguments parsed."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parse():
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _run_program(kind: str, target: str, args: list[str], stop: bool) -> tuple[object, str, str | None]:
    """Run a script (``kind`` "path") or module ("module") as ``__main__`` with ``args`` in this
    process; with ``stop``, until its arguments parsed. Returns (namespace or exit code, output, error)."""
    argv, path, out = sys.argv[:], sys.path[:], io.StringIO()
    sys.argv = [target] + args
    result, error = None, None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(out))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            if stop:
                stack.enter_context(_stop_after_parse())
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        error = "ran to its end without parsing arguments" if stop else None
    except _Parsed as p:
        result = p.namespace
    except SystemExit as e:
        result = e.code if e.code is not None else 0
        if stop or result != 0:
            error = f"exit {e.code}"
    except BaseException as e:  # noqa: BLE001 - reported
        error = f"{type(e).__name__}: {e}"
    finally:
        sys.argv, sys.path[:] = argv, path
    return result, out.getvalue(), error


def _tail(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def _wheel_fits(path: str) -> str | None:
    """None when ``path`` is a wheel that pip installs on CPython 3.12, Linux x86-64; else why not."""
    name = os.path.basename(path)
    if not name.endswith(".whl") or not os.path.isfile(path):
        return "not a file"
    if not zipfile.is_zipfile(path):
        return "not a zip file"
    parts = name[:-4].split("-")
    if len(parts) < 5:
        return "not a wheel's name"
    py, abi, plat = parts[-3:]
    py_ok = any(t in ("py3", "cp312") or (t.startswith("cp3") and abi == "abi3" and int(t[3:] or 0) <= 12)
                for t in py.split("."))
    plat_ok = plat == "any" or all(("x86_64" in p and ("manylinux" in p or "linux" in p)) for p in plat.split("."))
    return None if py_ok and plat_ok else f"tags {py}-{abi}-{plat} do not install on CPython 3.12 x86-64"


def _config_checks(namespace) -> list[str]:
    """Load every config file the parsed arguments name, with their overrides; the errors."""
    from ivfast.config import ConfigError, load_config

    paths = []
    for attr in ("config", "configs"):
        value = getattr(namespace, attr, None)
        paths += [value] if isinstance(value, str) else list(value or [])
    overrides = list(getattr(namespace, "overrides", None) or [])
    errors = []
    for path in paths:
        try:
            load_config(path, overrides)
        except ConfigError as e:
            errors.append(str(e))
    return errors


def _split_env(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    if argv and argv[0] == "env":
        argv = argv[1:]
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            k, v = argv[0].split("=", 1)
            env[k], argv = v, argv[1:]
    return env, argv


class Resolver:
    def __init__(self):
        self.parts: dict[str, dict] = {}  # part -> {"ok": bool, "notes": [...], "seconds": float}

    def note(self, part: str, ok: bool, text: str) -> None:
        entry = self.parts.setdefault(part, {"ok": True, "notes": [], "seconds": 0.0})
        entry["ok"] &= ok
        text = _short(text, 400)
        print(f"  [{part}] {'ok  ' if ok else 'FAIL'} {text}")
        if not ok or text.startswith(("collected", "rows", "parsed", "wheels", "carry", "budget", "imports", "paper",
                                      "gpu-only")):
            entry["notes"].append(text if ok else f"FAIL {text}")

    def python_ok(self, part: str, exe: str) -> bool:
        found = os.path.isfile(exe) and os.access(exe, os.X_OK) or bool(__import__("shutil").which(exe))
        if not found:
            self.note(part, False, f"python {exe}: not found")
        return found

    def start_pytest(self, part: str, exe: str, env: dict, args: list[str]):
        """``pytest --collect-only`` with the command's arguments, in a thread (the collections
        run side by side while this process resolves the rest)."""
        import threading

        job = {"part": part, "paths": " ".join(a for a in args if not a.startswith("-") and
                                               os.path.exists(os.path.join(ROOT, a)))}

        def collect():
            t0 = time.perf_counter()
            proc = subprocess.run([exe, "-m", "pytest", "--collect-only", *args], cwd=ROOT, text=True,
                                  env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            job.update(rc=proc.returncode, out=proc.stdout, seconds=time.perf_counter() - t0)

        job["thread"] = threading.Thread(target=collect)
        job["thread"].start()
        return job

    def finish_pytest(self, job) -> None:
        job["thread"].join()
        part, out = job["part"], job["out"]
        self.parts.setdefault(part, {"ok": True, "notes": [], "seconds": 0.0})["seconds"] += job["seconds"]
        m = re.search(r"(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", out)
        if job["rc"] == 0 and m:
            chosen = int(m.group(1))
            deselected = f", {m.group(3)} deselected" if m.group(3) else ""
            self.note(part, chosen > 0, f"collected {chosen} tests{deselected} ({_short(job['paths'], 60)})")
        else:
            self.note(part, False, f"pytest {job['paths']}: --collect-only exit {job['rc']}: {_tail(out, 4)}")

    def program(self, part: str, exe: str, argv: list[str]) -> None:
        t0 = time.perf_counter()
        if argv[0] == "-c":
            try:
                compile(argv[1], "<-c>", "exec")
                self.note(part, True, f"python -c <code>: compiles ({len(argv) - 2} arguments)")
            except SyntaxError as e:
                self.note(part, False, f"python -c <code>: {e}")
            return
        if argv[0] == "-m" and argv[1] == "pip":
            self.pip(part, argv[2:])
            return
        if argv[0] == "-m":
            kind, target, args = "module", argv[1], argv[2:]
            if importlib.util.find_spec(target) is None:
                self.note(part, False, f"python -m {target}: no such module")
                return
        else:
            kind, target, args = "path", argv[0], argv[1:]
            if not os.path.isfile(os.path.join(ROOT, target)):
                self.note(part, False, f"python {target}: no such file")
                return
        shown = f"{target} {' '.join(args)}"
        namespace, out, error = _run_program(kind, target, args, stop=True)
        if error:
            self.note(part, False, f"{_short(shown)}: {error}: {_tail(out)}")
            return
        errors = _config_checks(namespace)
        for e in errors:
            self.note(part, False, f"{_short(shown)}: {e}")
        if not errors:
            self.note(part, True, f"parsed: {_short(shown, 60)}")
        if hasattr(namespace, "dry_run"):
            code, out, error = _run_program(kind, target, args + ["--dry-run"], stop=False)
            for line in out.splitlines():
                if line.startswith("dry run:"):
                    print(f"         {line}")
            ok = error is None and code == 0
            rows = re.findall(r"dry run: (\d+) of (\d+) rows resolve", out)
            self.note(part, ok, f"rows: {rows[-1][0]} of {rows[-1][1]} resolve ({target} --dry-run)" if ok and rows
                      else f"{target} --dry-run: {error or code}: {_tail(out)}")
        self.parts[part]["seconds"] += time.perf_counter() - t0

    def pip(self, part: str, args: list[str]) -> None:
        if importlib.util.find_spec("pip") is None:
            self.note(part, False, "python -m pip: no pip")
            return
        wheels = [a for a in args if a.endswith(".whl")]
        if any("*" in w for w in wheels) or not wheels:
            self.note(part, True, "wheels: no .whl/ here: nothing to check but gpu_wheels.sh's list (carry below)")
            return
        bad = [(w, why) for w in wheels if (why := _wheel_fits(w))]
        for w, why in bad:
            self.note(part, False, f"{w}: {why}")
        if not bad:
            self.note(part, True, f"wheels: {len(wheels)} wheels in .whl/ install on CPython 3.12 x86-64")


def _short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _imports(res: Resolver, wheels: list[tuple[str, str, int]]) -> None:
    part = "imports"
    res.parts.setdefault(part, {"ok": True, "notes": [], "seconds": 0.0})
    t0 = time.perf_counter()
    os.environ.setdefault("IVFAST_BENCH_SHAPES", "paper")
    failed = []
    modules = list(LAZY_IMPORTS) + sorted(f"benchmarks.{os.path.basename(p)[:-3]}" for p in
                                          glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py"))
                                          if not p.endswith("bench_data.py"))
    import pkgutil

    import ivfast.ops

    modules += [f"ivfast.ops.{m.name}" for m in pkgutil.iter_modules(ivfast.ops.__path__)]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - reported
                failed.append(f"{name} ({type(e).__name__}: {e})")
    for f in failed:
        res.note(part, False, f"import {f}")
    if not failed:
        res.note(part, True, f"imports: {len(modules)} modules the parts need import here")
    for name, what in GPU_ONLY.items():
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                importlib.import_module(name)
            here = "imports here"
        except Exception as e:  # noqa: BLE001 - reported, not a failure
            here = f"not here ({type(e).__name__})"
        res.note(part, True, f"gpu-only {name}, {what}: {here}; needs the GPU machine's wheels (neither in its "
                             f"image nor carried: those rows skip there)")
    harness = sys.modules.get("benchmarks.harness")
    if harness is not None and getattr(harness, "SHAPE_PLANS", None):
        plans = ", ".join(f"{k} {len(v['paper'])}/{len(v['gpu'])}" for k, v in sorted(harness.SHAPE_PLANS.items()))
        res.note("bench", True, f"paper shapes of the GPU shapes (IVFAST_BENCH_SHAPES=paper): {plans}")
    # Every third-party distribution imported: in the GPU image, or carried.
    from importlib.metadata import packages_distributions

    carried = {_norm(n) for n, _, _ in wheels}
    owners = packages_distributions()
    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    absent = {}
    top = {m.split(".")[0] for m in list(sys.modules)}
    for mod in sorted(top - stdlib - LOCAL):
        if mod.startswith("_") and mod not in owners:
            continue
        dists = {_norm(d) for d in owners.get(mod, [])}
        if dists and not dists & (GPU_IMAGE | carried):
            absent[mod] = sorted(dists)
    for mod, dists in absent.items():
        gpu_only = any(mod == g.split(".")[0] for g in GPU_ONLY)
        res.note(part, gpu_only, f"{mod} ({', '.join(dists)}): imported here, neither in the GPU image nor carried"
                 + (" (GPU-only, above)" if gpu_only else ""))
    res.note(part, True, f"imports: every other third-party distribution imported is in the GPU image "
                         f"({GPU_IMAGE_VERSIONS}) or carried ({', '.join(sorted(carried))})")
    res.parts[part]["seconds"] += time.perf_counter() - t0


def _carry(res: Resolver, wheels: list[tuple[str, str, int]]) -> None:
    part = "carry"
    res.parts.setdefault(part, {"ok": True, "notes": [], "seconds": 0.0})
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                                capture_output=True).stdout.decode().split("\0")
        how = "git: tracked + untracked-not-ignored"
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", ".whl", ".gl", "__pycache__", ".pytest_cache", ".benchmarks"}
        listed = []
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
            listed += [os.path.relpath(os.path.join(d, f), ROOT) for f in files]
        how = "no git here: every file outside .git, .venv, runs, caches"
    if os.path.isdir(os.path.join(ROOT, "shared")):
        for d, _, files in os.walk(os.path.join(ROOT, "shared")):
            listed += [os.path.relpath(os.path.join(d, f), ROOT) for f in files]
    tree, n = 0, 0
    for rel in set(filter(None, listed)):
        path = os.path.join(ROOT, rel)
        if os.path.lexists(path) and not os.path.isdir(path):
            tree += os.lstat(path).st_size
            n += 1
    whl_dir = os.path.join(ROOT, ".whl")
    found = sorted(glob.glob(os.path.join(whl_dir, "*.whl")))
    if found:
        whl = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(whl_dir) for f in fs)
        names = {_norm(os.path.basename(f).split("-")[0]) for f in found}
        missing = [n_ for n_, _, _ in wheels if _norm(n_) not in names]
        extra = sorted(names - {_norm(n_) for n_, _, _ in wheels})
        versions = {}
        for f in found:
            versions.setdefault(_norm(os.path.basename(f).split("-")[0]), []).append(os.path.basename(f))
        dupes = [v for v in versions.values() if len(v) > 1]
        whl_how = f".whl/ measured ({len(found)} wheels)"
        if missing:
            res.note(part, False, f".whl/ lacks {', '.join(missing)} (bash benchmarks/gpu_wheels.sh)")
        if dupes:
            res.note(part, False, f".whl/ holds two versions of one package: {dupes} (pip would stop)")
        if extra:
            res.note(part, True, f".whl/ also holds {', '.join(extra)} (not in gpu_wheels.sh's list)")
    else:
        whl = sum(size for _, _, size in wheels)
        whl_how = f".whl/ not here: the {len(wheels)} wheels gpu_wheels.sh lists, at their listed sizes"
    total = tree + whl
    mib = 2**20
    res.note(part, total <= CARRY_LIMIT,
             f"carry: tree {tree / mib:.1f} MiB ({n} files; {how}) + {whl_how} {whl / mib:.1f} MiB "
             f"= {total / mib:.1f} MiB of {CARRY_LIMIT // mib} MiB")


def resolve(commands: str, wheels_file: str, budgets: str, budget_sum: int, total: int) -> int:
    res = Resolver()
    wheels = []
    for line in open(wheels_file):
        if line.strip():
            spec, size = line.split()
            name, version = spec.split("==")
            wheels.append((name, version, int(size)))
    jobs, programs, order = [], [], []
    for line in open(commands).read().split("\x1e")[:-1]:
        part, _, rest = line.partition("\t")
        argv = [a for a in rest.split("\x1f")][:-1]
        order.append(part) if part not in order else None
        res.parts.setdefault(part, {"ok": True, "notes": [], "seconds": 0.0})
        env, argv = _split_env(argv)
        if not argv or not res.python_ok(part, argv[0]):
            continue
        if argv[1:3] == ["-m", "pytest"]:
            jobs.append(res.start_pytest(part, argv[0], env, argv[3:]))
        else:
            programs.append((part, env, argv))
    for part, env, argv in programs:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            res.program(part, argv[0], argv[1:])
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    _imports(res, wheels)
    for job in jobs:
        res.finish_pytest(job)
    _carry(res, wheels)
    fits = budget_sum <= total <= DEVICE_COMMAND_LIMIT_S
    res.note("budget", fits, f"budget: {budgets}: {budget_sum} s of the {total} s total "
                             f"(<= {DEVICE_COMMAND_LIMIT_S} s, one device command); device run timeout_s {total + 60}")
    print("== dry-run summary")
    print(f"{'part':<8} {'result':<7} {'seconds':>7}  what")
    for part in order + ["imports", "carry", "budget"]:
        entry = res.parts[part]
        notes = "; ".join(entry["notes"]) or "every command resolves"
        print(f"{part:<8} {'ok' if entry['ok'] else 'FAILED':<7} {entry['seconds']:>7.1f}  {_short(notes, 400)}")
    return 0 if all(e["ok"] for e in res.parts.values()) else 1


# ----------------------------------------------------------------------------------- report
def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _value(v: str):
    try:
        return float(v) if "." in v or "e" in v.lower() else int(v)
    except ValueError:
        return None if v == "None" else v


def report(logdir: str, start: float, total: int) -> int:
    sys.path.insert(0, ROOT)
    from benchmarks.harness import RESULTS_DIR, on_gpu, write_results

    tag = "gpu" if on_gpu() else "cpu"
    rows, commands = [], {}
    for line in _read(os.path.join(logdir, "parts.tsv")).splitlines():
        name, status, secs, limit, budget = line.split("\t")
        log = _read(os.path.join(logdir, f"{name}.log"))
        commands[name] = [ln[2:] for ln in log.splitlines() if ln.startswith("+ ")]
        detail = ""
        if name == "setup":
            m = re.search(r"^environment: (\{.*\})$", log, re.M)
            detail = m.group(1) if m else _tail(log, 2)
        elif name in ("tests", "bench"):
            detail = "; ".join(re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*? in [\d.]+s.*?)=*$",
                                          log, re.M)) or _tail(log, 2)
        elif name == "zero2":
            m = re.search(r"^loss: .*$", log, re.M)
            detail = m.group(0) if m else _tail(log, 2)
        elif name == "step":
            step_rows = []
            for ln in log.splitlines():
                if ln.startswith("config="):
                    step_rows.append({k: _value(v) for k, v in (t.split("=", 1) for t in ln.split() if "=" in t)})
            detail = f"{len(step_rows)} rows"
            written = [p for p in glob.glob(os.path.join(RESULTS_DIR, f"step-{tag}-*.json")) if os.path.getmtime(p) >= start]
            if step_rows and not written:
                path = write_results("step_partial", {"note": f"benchmarks/step.py stopped ({status}); the rows it "
                                                              "printed before", "commands": commands[name]}, step_rows)
                detail += f", written {os.path.relpath(path, ROOT)}"
            elif written:
                detail += f", written {os.path.relpath(written[0], ROOT)}"
        elif name == "memory":
            m = re.search(r"^(\S+): (?:paper ([\d.]+) GB, )?release's way ([\d.]+), ivfast ([\d.]+), ivfast \+ "
                          r"checkpointing ([\d.]+) GiB(?:, measured ([\d.]+))?$", log, re.M)
            if m:
                row = {"config": m.group(1), "paper_gb": _value(m.group(2) or "None"),
                       "release_way_gib": float(m.group(3)), "ivfast_gib": float(m.group(4)),
                       "ivfast_ckpt_gib": float(m.group(5)), "measured_gib": _value(m.group(6) or "None")}
                path = write_results("memory_measure", {"commands": commands[name], "modelled": "ivfast.memory",
                                                        "measured": "3 DeepSpeed steps, peak allocated + CUDA context"},
                                     [row])
                detail = f"{m.group(0)}; written {os.path.relpath(path, ROOT)}"
            else:
                detail = _tail(log, 2)
        rows.append({"part": name, "status": status, "seconds": int(secs), "limit_s": int(limit),
                     "budget_s": int(budget), "detail": detail.replace("|", "/")})
    path = write_results("gpu_check", {"total_s": total, "commands": commands}, rows)
    print(f"gpu_check report: {os.path.relpath(path, ROOT)} and .md")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["resolve"] and len(argv) == 6:
        return resolve(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
    if argv[:1] == ["report"] and len(argv) == 4:
        return report(argv[1], float(argv[2]), int(argv[3]))
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    sys.exit(main())
