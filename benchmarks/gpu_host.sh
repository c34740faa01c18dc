#!/usr/bin/env bash
# The short GPU check (benchmarks/gpu_check.py) on a GPU host of your own. See BENCHMARKS.md,
# "GPU: the short check". Run from anywhere inside a clone of the repository.
#
# A GPU host with network access:
#   pip install "jax[cuda12]"                 # or "jax[cuda13]", unless the host has a GPU JAX
#   bash benchmarks/gpu_host.sh install       # the bench extra, taming's modules, vqgan-jax
#   bash benchmarks/gpu_host.sh run           # about 5 minutes; each row printed as measured
#
# A GPU host without network access: on a machine with network, the same OS and the same
# Python version as the host, download everything into the git-ignored third_party/, then
# copy the clone (third_party/ included) to the host:
#   bash benchmarks/gpu_host.sh fetch [PACKAGE ...]
#   bash benchmarks/gpu_host.sh install-offline   # on the GPU host
#   bash benchmarks/gpu_host.sh run
# `fetch` with no PACKAGE downloads the project with its bench extra and every dependency; with
# PACKAGEs it downloads only those, without their dependencies (for a host that already has
# JAX, flax and torch, e.g. `fetch datasets webdataset dill multiprocess xxhash braceexpand
# simplejpeg einops`). Extra `pip download` options (e.g. `--platform manylinux2014_x86_64
# --python-version 3.11 --only-binary=:all:`) go in PIP_DOWNLOAD_OPTS.
set -euo pipefail
cd "$(dirname "$0")/.."

# The reference implementations the check compares against, pinned.
TAMING="taming-transformers-rom1504==0.0.6"             # PyPI; installed without its deps
VQGAN_JAX_URL="${VQGAN_JAX_URL:-https://github.com/patil-suraj/vqgan-jax.git}"
VQGAN_JAX_COMMIT="10ef240f8ace869e437f3c32d14898f61512db12"   # merge of PR #10
WHEELS=third_party/wheels

clone_vqgan_jax() {
    if [ ! -d third_party/vqgan-jax/.git ]; then
        mkdir -p third_party
        git clone --quiet "$VQGAN_JAX_URL" third_party/vqgan-jax
    fi
    git -C third_party/vqgan-jax checkout --quiet "$VQGAN_JAX_COMMIT"
    echo "vqgan-jax at $(git -C third_party/vqgan-jax rev-parse HEAD)"
}

case "${1:-}" in
install)
    pip install -e ".[bench]"
    pip install --no-deps "$TAMING"   # its declared deps (Lightning, a CUDA torch) are not needed
    clone_vqgan_jax
    ;;
fetch)
    shift
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086  # PIP_DOWNLOAD_OPTS is a list of options
    if [ "$#" -gt 0 ]; then
        pip download ${PIP_DOWNLOAD_OPTS:-} --no-deps -d "$WHEELS" "$@" "$TAMING"
    else
        pip download ${PIP_DOWNLOAD_OPTS:-} -d "$WHEELS" ".[bench]" setuptools
        pip download ${PIP_DOWNLOAD_OPTS:-} --no-deps -d "$WHEELS" "$TAMING"
    fi
    rm -f "$WHEELS"/vqgan_datasets-*   # the project itself runs from this clone
    clone_vqgan_jax
    du -sh third_party
    ;;
install-offline)
    pip install --no-index --no-deps "$WHEELS"/*
    # taming-transformers-rom1504 lists dependencies it does not need here (pytorch-lightning):
    # any other missing package listed below needs fetching too.
    pip check || true
    ;;
run)
    # JAX and torch share the GPU: JAX takes 55% of its memory, torch the rest.
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.55}"
    export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"   # the package from this clone
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import sys, jax, flax, torch; print('python', sys.version.split()[0], \
'jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
    python benchmarks/gpu_check.py --vqgan-jax third_party/vqgan-jax --e2e --families
    ;;
*)
    echo "usage: $0 install | fetch [PACKAGE ...] | install-offline | run" >&2
    exit 2
    ;;
esac
