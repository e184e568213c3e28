#!/usr/bin/env bash
# The main job on the embedded default: installs raylm into .venv, then runs `raylm demo`
# (prepare -> train -> eval -> generate on Shakespeare with local Ray). Extra arguments go to
# `raylm demo`, e.g. scripts/demo.sh train.max_steps=200
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/raylm demo "$@"
