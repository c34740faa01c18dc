#!/usr/bin/env bash
# Fetch the reference implementations that the fixture recipes (tests/fixtures/*/make_fixtures.py)
# and benchmarks/families.py run, into third_party/ (git-ignored, never committed).
#
#     bash benchmarks/fetch_references.sh          # from the repository root; needs git and pip
#
# Each reference repository is read at its pinned commit (a shallow fetch of that one commit into
# a temporary folder, or a local clone in place); only the files the recipes import are copied
# (Windows line endings removed) with empty __init__.py files where they import as packages,
# then ml_collections (which MaskGIT's original Flax code imports) is installed into
# third_party/pylib with pip. Each folder it writes (llamagen, ibq, magvit2, maskgit, pylib) is
# replaced as a whole; anything else in third_party/ is left alone.
#
# Settings (environment variables):
#   THIRD_PARTY=DIR        write there instead of third_party/ in the repository root
#   REFERENCES_FROM=DIR    fetch from local clones DIR/LlamaGen, DIR/SEED-Voken, DIR/1d-tokenizer
#                          and DIR/maskgit instead of GitHub (each must hold the pinned commit)
#   LLAMAGEN_REPO, SEED_VOKEN_REPO, TOKENIZER_1D_REPO, MASKGIT_REPO
#                          a git URL or local path for one repository (wins over the above)
#   PYTHON                 the interpreter whose pip installs ml_collections (default: python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${THIRD_PARTY:-$ROOT/third_party}
PYTHON=${PYTHON:-python}
ML_COLLECTIONS=ml_collections==1.1.0

LLAMAGEN=ce98ec41803a74a90ce68c40ababa9eaeffeb4ec     # FoundationVision/LlamaGen
SEED_VOKEN=b9a17eac8e2c0779c12a5429b0bfd6c502788484   # TencentARC/SEED-Voken (IBQ, Open-MAGVIT2)
TOKENIZER_1D=942a96fbdd873780179d1b78d5462911528bf8c8 # bytedance/1d-tokenizer (MaskGIT port)
MASKGIT=1db23594e1bd328ee78eadcd148a19281cd0f5b8      # google-research/maskgit (original Flax)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/out

# fetch OWNER/NAME COMMIT OVERRIDE_VAR: $WORK/NAME becomes a git folder holding that commit: a
# link to the local clone when one is given, else a one-commit shallow fetch.
fetch() {
    local repo=$1 commit=$2 override=$3 name=${1#*/} url
    if [ -n "${!override:-}" ]; then
        url=${!override}
    elif [ -n "${REFERENCES_FROM:-}" ]; then
        url=$REFERENCES_FROM/$name
    else
        url=https://github.com/$repo
    fi
    if [ -d "$url" ]; then
        if ! git -C "$url" cat-file -e "$commit^{commit}" 2>/dev/null; then
            echo "error: $url has no commit $commit of $repo (git -C $url fetch origin)" >&2
            exit 1
        fi
        echo "reading $repo at $commit from the clone in $url"
        ln -s "$(cd "$url" && pwd)" "$WORK/$name"
        return
    fi
    echo "fetching $repo at $commit from $url"
    git init -q "$WORK/$name"
    if ! git -C "$WORK/$name" fetch -q --depth 1 "$url" "$commit"; then
        echo "error: could not fetch commit $commit of $repo from $url" >&2
        echo "(set $override to a local clone that holds it)" >&2
        exit 1
    fi
}

# export NAME COMMIT TARGET FILE...: each FILE of that commit to $STAGE/TARGET/FILE, without \r.
export_files() {
    local name=$1 commit=$2 target=$3 file
    shift 3
    for file in "$@"; do
        mkdir -p "$STAGE/$target/$(dirname "$file")"
        git -C "$WORK/$name" show "$commit:$file" | tr -d '\r' > "$STAGE/$target/$file"
    done
}

# packages TARGET DIR...: an empty __init__.py in each DIR, so the exported files import as a package.
packages() {
    local target=$1 dir
    shift
    for dir in "$@"; do
        mkdir -p "$STAGE/$target/$dir"
        : > "$STAGE/$target/$dir/__init__.py"
    done
}

# LlamaGen: tests/fixtures/llamagen, benchmarks/families.py ("llamagen").
fetch FoundationVision/LlamaGen "$LLAMAGEN" LLAMAGEN_REPO
mkdir -p "$STAGE/llamagen"
git -C "$WORK/LlamaGen" show "$LLAMAGEN:tokenizer/tokenizer_image/vq_model.py" | tr -d '\r' \
    > "$STAGE/llamagen/vq_model.py"
git -C "$WORK/LlamaGen" show "$LLAMAGEN:dataset/augmentation.py" | tr -d '\r' \
    > "$STAGE/llamagen/augmentation.py"

# SEED-Voken: tests/fixtures/ibq and tests/fixtures/open_magvit2, families "ibq", "open_magvit2".
fetch TencentARC/SEED-Voken "$SEED_VOKEN" SEED_VOKEN_REPO
export_files SEED-Voken "$SEED_VOKEN" ibq \
    src/IBQ/modules/diffusionmodules/model.py src/IBQ/modules/vqvae/quantize.py \
    src/IBQ/modules/ema.py
packages ibq src src/IBQ src/IBQ/modules src/IBQ/modules/diffusionmodules src/IBQ/modules/vqvae
export_files SEED-Voken "$SEED_VOKEN" magvit2 \
    src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py \
    src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py src/Open_MAGVIT2/modules/ema.py
packages magvit2 src src/Open_MAGVIT2 src/Open_MAGVIT2/modules \
    src/Open_MAGVIT2/modules/diffusionmodules src/Open_MAGVIT2/modules/vqvae

# MaskGIT: the PyTorch port (1d-tokenizer) and Google's original Flax code, tests/fixtures/maskgit
# and family "maskgit".
fetch bytedance/1d-tokenizer "$TOKENIZER_1D" TOKENIZER_1D_REPO
mkdir -p "$STAGE/maskgit/torch_port"
git -C "$WORK/1d-tokenizer" show "$TOKENIZER_1D:modeling/modules/maskgit_vqgan.py" \
    | tr -d '\r' > "$STAGE/maskgit/torch_port/maskgit_vqgan.py"
fetch google-research/maskgit "$MASKGIT" MASKGIT_REPO
export_files maskgit "$MASKGIT" maskgit/flax_original \
    maskgit/nets/vqgan_tokenizer.py maskgit/nets/layers.py maskgit/libml/losses.py
packages maskgit/flax_original maskgit maskgit/nets maskgit/libml

# ml_collections for the original MaskGIT code (its own dependencies, absl-py and PyYAML, come
# with jax/flax installs; installed here too when the interpreter lacks them).
echo "installing $ML_COLLECTIONS into pylib"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --target "$STAGE/pylib" \
    "$ML_COLLECTIONS"
missing=$("$PYTHON" - <<'EOF'
import importlib.util
print(" ".join(p for m, p in (("absl", "absl-py"), ("yaml", "PyYAML"))
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086  # one word per package
    "$PYTHON" -m pip install -q --disable-pip-version-check --target "$STAGE/pylib" $missing
fi

mkdir -p "$DEST"
for dir in llamagen ibq magvit2 maskgit pylib; do
    rm -rf "${DEST:?}/$dir"
    mv "$STAGE/$dir" "$DEST/$dir"
done
echo "reference code in $DEST: llamagen ibq magvit2 maskgit pylib"
echo "the recipes also need: torch, einops, scikit-image (pip install torch einops scikit-image)"
