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
# The wheels go to a folder of their own on the path: the image's Python may refuse installs (PEP 668), and
# its own packages stay as they are.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}

{
    date -u
    nvidia-smi -L
    lscpu | grep -E '^(Model name|CPU\(s\)|Flags)'
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} 2>&1 | tee "$out/gpu-env.txt"

ls .gpu/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in .gpu/wheels: run make gpu-kit here, carry .gpu"; exit 2; }
python3 -m pip install -q --no-index --no-deps --target .gpu/site .gpu/wheels/*.whl || exit 2
# Before any device time goes on tests: everything the daemon, the tests and the bench import is there.
python3 -c 'import reloader.server, reloader.cli, bench.gpu, httpx, pytest' || { echo "a package is missing"; exit 2; }

# The tests about CUDA, those that need it and those of the choices made for it. Not the rest: the image's torch
# (2.11 when last seen) is older than this project's floor (pyproject.toml), under which compiled packages fail
# to build for reasons that are not the GPU's.
timeout 180 python3 -m pytest -p no:cacheprovider -q -rs -k cuda tests/test_precision.py tests/test_batching.py \
    tests/test_worker.py tests/test_compile.py 2>&1 | tee "$out/gpu-tests.txt"
tests=$?

timeout 300 python3 -m bench.gpu --out "$out/GPU.md"
bench=$?
echo "tests rc=$tests bench rc=$bench"
exit $((tests || bench))
