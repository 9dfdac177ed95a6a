#!/usr/bin/env bash
# Run HERE (a CPU machine with PyPI): put into .whl/ the Python 3.12 wheels that the GPU
# machine lacks (its image has torch, triton, numpy, pytest, pytest-benchmark, pytest-xdist,
# einops, safetensors, pyyaml, tqdm, matplotlib, psutil, msgpack, ninja; it has no registry).
# Together 40.8 MB (38.9 MiB, sizes below), under the 64 MiB that travels with a device run
# together with the working tree (`bash benchmarks/gpu_check.sh --dry-run` checks the sum). DALI
# (about 200 MB) and flash-attn do not fit: their rows stay unmeasured there. Also writes
# .whl/commit.txt (the commit of this checkout, "-dirty" with local changes), which the check
# records when the device machine has no git history.
#   bash benchmarks/gpu_wheels.sh          # fetch (files already in .whl/ are kept)
#   bash benchmarks/gpu_wheels.sh --list   # the wheels and their sizes, one "name==version bytes" a line
set -euo pipefail
cd "$(dirname "$0")/.."
# name==version and the size in bytes of its cp312 manylinux x86-64 wheel (deepspeed: the
# pure-Python wheel built from its sdist below), measured 2026-12-05.
WHEELS=(
    "av==18.1.0 35786210"
    "hjson==3.1.0 54018"
    "pydantic==2.14.4 494865"
    "pydantic-core==2.50.5 2264846"
    "annotated-types==0.8.0 13427"
    "typing-inspection==0.4.5 14874"
    "py-cpuinfo==9.0.0 22335"
    "deepspeed==0.19.8 2168852"
)
if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "${WHEELS[@]}"
    exit 0
fi
PY=${PY:-.venv/bin/python}
mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fetch=()
for w in "${WHEELS[@]}"; do
    spec=${w%% *}
    [ "${spec%%==*}" = deepspeed ] || fetch+=("$spec")
done
$PY -m pip download -q --no-deps "${plat[@]}" -d .whl "${fetch[@]}"
# DeepSpeed is an sdist: build a pure-Python wheel (no ops compiled ahead; JIT on use).
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit-dirty"
echo "$commit" > .whl/commit.txt
ls -la .whl
du -sh .whl
