#!/usr/bin/env bash
# The one device script for a lent GPU host (see BENCHMARKS.md, "The short GPU check").
#
# Here, once, before the device call (everything lands in the git-ignored third_party/):
#   bash benchmarks/gpu_host.sh prepare
# On the device (run with carry=["third_party"], timeout_s 480; prints each row as measured):
#   bash benchmarks/gpu_host.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
# Packages the GPU image lacks (NOTES.md): ours, datasets' own, webdataset's, taming's.
WHEELS="datasets webdataset dill multiprocess braceexpand xxhash simplejpeg einops taming-transformers-rom1504"

case "${1:-run}" in
prepare)
    mkdir -p third_party/wheels third_party/vqgan-jax
    pip download -q --no-deps --python-version 3.11 --only-binary=:all: -d third_party/wheels \
        $WHEELS 2>/dev/null || pip download -q --no-deps -d third_party/wheels $WHEELS
    if [ -d /work/.mirror/patil-suraj+vqgan-jax/repo ] && [ ! -e third_party/vqgan-jax/vqgan_jax ]; then
        git -C /work/.mirror/patil-suraj+vqgan-jax/repo archive 10ef240 | tar -x -C third_party/vqgan-jax
    fi
    du -sh third_party
    ;;
run)
    for wheel in third_party/wheels/*.whl; do  # one by one: a wheel for another Python is skipped
        pip install -q --no-deps --target third_party/pydeps "$wheel" || echo "skipped $wheel"
    done
    export PYTHONPATH=".:third_party/pydeps${PYTHONPATH:+:$PYTHONPATH}"
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.55  # JAX and torch share the GPU
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    python benchmarks/gpu_check.py --vqgan-jax third_party/vqgan-jax --e2e
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
