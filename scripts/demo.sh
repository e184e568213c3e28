#!/usr/bin/env bash
# The main job on the embedded default: installs raylm into .venv, then runs `raylm demo`.
# Extra arguments go to `raylm demo` (e.g. key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
for preset in tiny gpt2-small gpt2-medium gpt2-large gpt2-xl gpt3-xl; do
  .venv/bin/raylm model-info --preset "$preset" --num-workers 8
  echo
done
