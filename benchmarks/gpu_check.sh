#!/usr/bin/env bash
# Issue 19's GPU check: CUDA correctness, speed ratios, labeling at paper scale, `handsoff generate`.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [options of benchmarks/gpu_check.py]
#   bash benchmarks/gpu_check.sh "$OUT"                                  # on the device machine
#   OMP_NUM_THREADS=1 nice -n 5 bash benchmarks/gpu_check.sh /tmp/gc --device cpu --quick   # smoke test on a CPU
#   bash benchmarks/gpu_check.sh --prepare-carry    # here, once: copy the test vectors into .gpu/ (carry it)
#
# OUT_DIR defaults to $OUT. Writes the JSON results (see gpu_check.py's docstring) and gpu-check.log there.
# No installation: it runs the repository from PYTHONPATH with $PYTHON, else ./.venv/bin/python when it
# imports torch, else python3 (on the device machine: the image's python3 with torch, nvcc and ninja;
# handsoff needs nothing that image lacks, and it has no network for scripts/setup.sh anyway).
# Exit status: 0 all parts passed, 1 some part failed or ran out of time (results written), 2 bad input.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$(pwd)
vectors_src="$root/../shared/testvectors/stylegan"
carried="$root/.gpu/testvectors/stylegan"
nvlabs=(nvlabs_sg2ada_64_G_ema.safetensors nvlabs_sg2ada_64_expected.npz)

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

if [ "${1:-}" = "--prepare-carry" ]; then
    # The device machine gets the repository only: ../shared stays behind. The NVlabs vectors (17 MB)
    # travel in .gpu/ (ignored by git; name it in the run's carry). The rosinality ones would push the
    # working tree past the 64 MiB a call may carry, and pytest's generator tests do not need them there.
    for f in "${nvlabs[@]}"; do [ -f "$vectors_src/$f" ] || die "missing $vectors_src/$f"; done
    mkdir -p "$carried" || die "cannot create $carried"
    for f in "${nvlabs[@]}"; do cp -f "$vectors_src/$f" "$carried/$f" || die "cannot copy $f"; done
    echo "copied the NVlabs test vectors to .gpu/testvectors/stylegan ($(du -sh "$carried" | cut -f1)); carry .gpu"
    exit 0
fi

out=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out=$1; shift; fi
out=${out:-${OUT:-}}
[ -n "$out" ] || die "no output folder: pass one as the first argument or set OUT"
mkdir -p "$out" 2>/dev/null || die "cannot create the output folder $out"
[ -d "$out" ] && [ -w "$out" ] || die "cannot write to the output folder $out"
out=$(cd "$out" && pwd)

# Python: one that imports torch.
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
        python=.venv/bin/python
    else
        python=$(command -v python3 || true)
    fi
fi
[ -n "$python" ] || die "no python3 found (set PYTHON)"

# nvcc: torch's extension builder finds the toolkit through it.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH" CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi

# tests/test_generator.py reads ../shared/testvectors/stylegan: link the carried copy there if it is absent.
if [ ! -f "$vectors_src/${nvlabs[0]}" ] && [ -f "$carried/${nvlabs[0]}" ]; then
    if mkdir -p "$(dirname "$vectors_src")" 2>/dev/null && ln -sfn "$carried" "$vectors_src" 2>/dev/null; then
        echo "linked $vectors_src -> .gpu/testvectors/stylegan"
    else
        echo "note: could not link $vectors_src; pytest skips the vector tests (the correctness part reads .gpu/)"
    fi
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "gpu_check.sh: $python ($("$python" -c 'import sys; print(sys.version.split()[0])' 2>&1)), output $out"
"$python" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
