#!/usr/bin/env bash
# Run HERE (a CPU machine with PyPI): put into .whl/ the Python 3.12 wheels that the GPU
# machine lacks (it has torch, triton, numpy, pytest, pytest-benchmark, einops, safetensors,
# pyyaml, tqdm, matplotlib; it has no registry). Together about 41 MB, under the 64 MiB that
# travels with a device run. DALI (about 200 MB) does not fit: the DALI rows stay unmeasured
# there. Usage: bash benchmarks/gpu_wheels.sh   (then carry .whl; see benchmarks/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps "${plat[@]}" -d .whl av==18.1.0 hjson==3.1.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 py-cpuinfo==9.0.0
# DeepSpeed is an sdist: build a pure-Python wheel (no ops compiled ahead; JIT on use).
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
ls -la .whl
du -sh .whl
