#!/usr/bin/env bash
# The GPU check in one command, for a session whose task is lent a GPU machine (the `device` tool's `run`):
#   here:  make gpu-kit
#   there: run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540)
# It installs the wheels the machine's image lacks (.gpu/wheels; nothing can be fetched there), runs the
# tests about CUDA (those that need it skip here), then bench/gpu.py, whose tables are what README's "What
# was tested where" should then say. Its torch is the image's own, not this project's
# pin. Writes under $OUT (what the tool brings back) or bench/out: gpu-env.txt, gpu-tests.txt, GPU.md.
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    date -u
    nvidia-smi -L
    lscpu | grep -E '^(Model name|CPU\(s\)|Flags)'
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} 2>&1 | tee "$out/gpu-env.txt"

python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl || { echo "no wheels: run make gpu-kit here"; exit 2; }

# The tests about CUDA, those that need it and those of the choices made for it. Not the rest: the image's torch
# (2.11 when last seen) is older than this project's floor (pyproject.toml), under which compiled packages fail
# to build for reasons that are not the GPU's.
timeout 240 python3 -m pytest -p no:cacheprovider -q -rs -k cuda tests/test_precision.py tests/test_batching.py \
    tests/test_worker.py tests/test_compile.py 2>&1 | tee "$out/gpu-tests.txt"
tests=$?

timeout 300 python3 -m bench.gpu --out "$out/GPU.md"
bench=$?
echo "tests rc=$tests bench rc=$bench"
exit $((tests || bench))
