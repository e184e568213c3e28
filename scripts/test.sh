#!/usr/bin/env bash
# Installs raylm with its dev extra into .venv (CPU torch on CPU machines) and runs the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
# Two pytest-xdist workers by default (RAYLM_TEST_WORKERS=0: one process): on 2 cores one process leaves
# a core idle while tests wait on Ray; tests/conftest.py keeps each module and each shared run on one
# worker.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev || exit 1
# Loopback-only Ray, DeepSpeed on CPU (tests/conftest.py sets the rest before Ray starts).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 AWS_EC2_METADATA_DISABLED=true DS_ACCELERATOR=cpu
workers=${RAYLM_TEST_WORKERS:-2}
xdist=()
if [ "$workers" != 0 ]; then
  xdist=(-n "$workers" --no-loadscope-reorder)
fi
.venv/bin/python -m pytest "${xdist[@]}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treating as a failure, the suite must not be empty" >&2
  exit 1
fi
exit "$rc"
