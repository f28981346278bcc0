#!/usr/bin/env bash
# Every benchmark of issue 5, in sequence, on one H200 inside one 10-minute device command.
#
#   bash benchmarks/run_gpu.sh                 # from the repo root; results under $OUT (default /tmp/jpaged-bench-out)
#
# The five default sections fit the 10 minutes (~440 s on the H200, fourteenth session); where they do not, split
# them over two device calls, each figure still measured beside its baseline in one call:
#   SECTIONS="hf jpaged" bash benchmarks/run_gpu.sh        # throughput: HF and jpaged on the same requests
#   SECTIONS="kernels latency" bash benchmarks/run_gpu.sh   # kernels against JAX's own; single-stream latency
# and run benchmarks/summary.py / plot.py over both results.json files afterwards.
#
# Assumes the caller already made jpaged's dependencies importable (pip install --target /tmp/site .whl/*.whl;
# export PYTHONPATH=/tmp/site:$PWD); benchmarks/_bootstrap.py maps jpaged.models/kernels/server from the checkout.
# Each step gets a time limit cut to what is left of BUDGET_S; a step that runs out is killed (with its children)
# and the next one runs. Every script merges its record into $OUT/results.json as soon as it has one, so a killed
# step keeps what it finished. $OUT ends with at most 6 files: results.json, run.log, summary.md and up to three PNGs.
#
# Knobs (environment): BUDGET_S (560), SECTIONS ("ceilings kernels hf jpaged latency"; "ceilings" measures this
# machine's copy bandwidth and bf16 matmul rate as the roofline's constants were measured; also "gputests",
# "profile", "micro", "warmup", "mixtral", "gemmlibs" (each weight projection under XLA's Triton GEMMs and under
# cuBLAS), "pdlab" (single-stream latency with XLA's programmatic dependent launch as it comes and turned off),
# "decodeab" (the decode kernel's default tuning against DECODE_TUNING ("ppb=4": q rows on M) in its GPU tests,
# alone over an engine-sized pool, and in fixed:128 and single-stream latency), "stepcopies" (fixed:128, fixed:512
# and single-stream latency with the engine's step compiled once, as it is, and twice, calls taking turns:
# with_step_copies.py),
# "pinnedinput" (input_copy.py, then fixed:128, fixed:512 and single-stream latency with each step's packed input
# passed as it is and staged in pinned host memory: with_pinned_input.py),
# MODEL (llama2-7b), JPAGED_RUNS ("fixed:128 sharegpt-synthetic:256 fixed:512"), HF_FIXED_N (128), HF_FIXED_BATCH
# (128), HF_SHAREGPT_N (256; 0: no ShareGPT run of HF),
# HF_SHAREGPT_BATCH (64), HF_SHAREGPT_MAX_BATCHES (1: one batch run, the rest extrapolated; 0: all),
# HF_SHAREGPT_LIMIT_S (150: seconds for that step; its one batch of 64 generates to its longest request, up to
# 1,024 tokens: ~92 s of generate() plus ~15 s of start-up on the H200; 100 s was too little),
# KERNEL_GRID (quick), CONTEXT_SWEEP (512,1024,2048,4096,8192,16384; empty: none), MAX_MODEL_LEN (2048),
# JPAGED_COMMIT (the commit to record: the copied tree has no .git), PYTHON (python3), EXTRA_ENGINE_ARGS (flags
# for both jpaged processes, e.g. "--attn-impl pallas"), KERNEL_ARGS / TP_ARGS / LATENCY_ARGS (extra flags for
# kernels.py / every throughput.py call / latency.py), WARMUP_WORKERS (16: the warmup section's concurrent
# compilations; 1 times each variant alone, several minutes for the 7B shape), JAX_CACHE (0).
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/jpaged-bench-out}
mkdir -p "$OUT"
RESULTS=$OUT/results.json
LOG=$OUT/run.log
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-560}
SECTIONS=${SECTIONS:-"ceilings kernels hf jpaged latency"}
MODEL=${MODEL:-llama2-7b}
JPAGED_RUNS=${JPAGED_RUNS:-"fixed:128 sharegpt-synthetic:256 fixed:512"}
HF_FIXED_N=${HF_FIXED_N:-128}
HF_FIXED_BATCH=${HF_FIXED_BATCH:-128}
HF_SHAREGPT_N=${HF_SHAREGPT_N:-256}
HF_SHAREGPT_BATCH=${HF_SHAREGPT_BATCH:-64}
HF_SHAREGPT_MAX_BATCHES=${HF_SHAREGPT_MAX_BATCHES:-1}
KERNEL_GRID=${KERNEL_GRID:-quick}
CONTEXT_SWEEP=${CONTEXT_SWEEP-512,1024,2048,4096,8192,16384}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
EXTRA_ENGINE_ARGS=${EXTRA_ENGINE_ARGS:-}
KERNEL_ARGS=${KERNEL_ARGS:-}
TP_ARGS=${TP_ARGS:-}
LATENCY_ARGS=${LATENCY_ARGS:-}

export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TF_CPP_MIN_LOG_LEVEL=1 TOKENIZERS_PARALLELISM=false
# JAX's own default is 75% of the GPU: the engine's KV pool is sized from what JAX may use (the fifth session's
# fixed:512 ran at the default with 84.7 GB of pages instead of 104.9, and preempted 92 times). HF runs in its own
# process, before JAX starts.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# JAX's persistent compilation cache stays off unless JAX_CACHE=1 (then a later process reuses what an earlier one
# compiled); off, every process compiles cold, so the warm-up times are cold ones.
if [[ "${JAX_CACHE:-0}" == 1 ]]; then
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jpaged-jax-cache}
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}
fi

START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, what is left), logging to run.log.
step() {
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(left)
  if ((remaining < 30)); then
    echo "== $name: skipped, ${remaining}s of the budget left" | tee -a "$LOG"
    return 0
  fi
  ((limit > remaining)) && limit=$remaining
  echo "== $name (limit ${limit}s, $(($(date +%s) - START))s elapsed): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(($(date +%s) - t0))s$([[ $rc == 124 ]] && echo ' (TIME LIMIT: killed)')" | tee -a "$LOG"
}

echo "== start $(date -u +%FT%TZ), budget ${BUDGET_S}s, sections: $SECTIONS, model $MODEL" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee -a "$LOG"

if want gputests; then  # every test marked gpu (kernels against their references, the engine on them, bf16 parity)
  # --continue-on-collection-errors: modules importing what the device image lacks (uvicorn, playwright) hold no gpu
  # test, but a collection error would stop the run before any test
  step gpu-tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --continue-on-collection-errors tests
fi

if want ceilings; then  # this machine against the roofline's constants (one lent H200 differs from another)
  step ceilings-copy 40 "$PY" benchmarks/ceilings.py --framework torch --json-out "$RESULTS" --json-key ceilings_copy
  step ceilings-matmul 40 "$PY" benchmarks/ceilings.py --framework jax --json-out "$RESULTS" --json-key ceilings_matmul
fi

if want kernels; then
  # shellcheck disable=SC2086
  step kernels 170 "$PY" benchmarks/kernels.py --grid "$KERNEL_GRID" ${CONTEXT_SWEEP:+--context-sweep "$CONTEXT_SWEEP"} \
    $KERNEL_ARGS --json-out "$RESULTS" --json-key kernels
fi

if want hf; then  # HF first and alone: JAX is not running, so torch has the GPU to itself
  # shellcheck disable=SC2086
  step hf-fixed 80 "$PY" benchmarks/throughput.py --engine hf --model "$MODEL" --run "fixed:$HF_FIXED_N" \
    --batch-size "$HF_FIXED_BATCH" $TP_ARGS --json-out "$RESULTS" --json-key hf_fixed
  if ((HF_SHAREGPT_N > 0)); then
    # shellcheck disable=SC2086
    step hf-sharegpt "${HF_SHAREGPT_LIMIT_S:-150}" "$PY" benchmarks/throughput.py --engine hf --model "$MODEL" \
      --run "sharegpt-synthetic:$HF_SHAREGPT_N" --batch-size "$HF_SHAREGPT_BATCH" \
      --hf-max-batches "$HF_SHAREGPT_MAX_BATCHES" $TP_ARGS --json-out "$RESULTS" --json-key hf_sharegpt
  fi
fi

if want jpaged; then
  runs=()
  for r in $JPAGED_RUNS; do runs+=(--run "$r"); done
  # shellcheck disable=SC2086
  step jpaged-throughput 230 "$PY" benchmarks/throughput.py --engine jpaged --model "$MODEL" "${runs[@]}" \
    --max-model-len "$MAX_MODEL_LEN" $EXTRA_ENGINE_ARGS $TP_ARGS --json-out "$RESULTS" --json-key jpaged_throughput
fi

if want latency; then
  # No bucket warm-up here (the throughput run reports it): the first request of each length is discarded instead.
  # shellcheck disable=SC2086
  step latency 100 "$PY" benchmarks/latency.py --model "$MODEL" --no-warmup --iters 2 $EXTRA_ENGINE_ARGS $LATENCY_ARGS \
    --json-out "$RESULTS" --json-key latency
fi

if want warmup; then  # each step variant's compile seconds under the engine's concurrency (--workers 1: alone; slow)
  # shellcheck disable=SC2086
  step warmup 240 "$PY" benchmarks/warmup.py --model "$MODEL" --workers "${WARMUP_WORKERS:-16}" --one-row both \
    --max-model-len "$MAX_MODEL_LEN" $EXTRA_ENGINE_ARGS --json-out "$RESULTS" --json-key warmup
fi

if want profile; then  # where a decode step's time goes (device busy, top kernels, idle gaps); traces stay on the GPU host
  # shellcheck disable=SC2086
  step profile 150 "$PY" benchmarks/profile_step.py --model "$MODEL" --batches 128 1 --trace-dir /tmp/jpaged-trace \
    $EXTRA_ENGINE_ARGS --json-out "$RESULTS" --json-key profile
fi

if want micro; then  # the pieces behind the open misses: weight GEMMs (XLA's Triton vs cuBLAS, fused layouts), KV
  # writes against their bytes, and the MoE grouped matmul as a padded decode step runs it (with a tuning sweep)
  step gemm 90 "$PY" benchmarks/gemm.py --cublas --json-out "$RESULTS" --json-key gemm
  step kv-write 60 "$PY" benchmarks/kv_write.py --json-out "$RESULTS" --json-key kv_write
  step moe-padded 150 "$PY" benchmarks/moe.py --padded --tokens 1,16,128 --impls xla,pallas --sweep \
    --json-out "$RESULTS" --json-key moe_padded
fi

if want gemmlibs; then  # each projection at 1 and 128 rows under XLA's Triton GEMMs and under cuBLAS, over copies
  # past the L2 (a whole layer under cuBLAS lost; per projection it is unmeasured: down and o stream ~3.3 TB/s)
  step gemm-libs 150 "$PY" benchmarks/gemm.py --rows 1 128 --cublas --sweep --max-configs 0 --iters 30 \
    --json-out "$RESULTS" --json-key gemm_libs
fi

if want pdlab; then  # single-stream latency with XLA's programmatic dependent launch as it comes, then turned off
  for pdl in default false; do
    flags=${XLA_FLAGS:-}
    [[ $pdl == false ]] && flags="$flags --xla_gpu_enable_pdl=false --xla_gpu_enable_pdl_launch=false"
    # shellcheck disable=SC2086
    step "pdl-latency-$pdl" 80 env XLA_FLAGS="$flags" "$PY" benchmarks/latency.py --model "$MODEL" --no-warmup \
      --iters 2 --prefill-batch 0 $EXTRA_ENGINE_ARGS --json-out "$RESULTS" --json-key "pdl_latency_$pdl"
  done
fi

if want decodeab; then  # the decode kernel's default tuning against DECODE_TUNING in the engine, same call
  dt=${DECODE_TUNING:-ppb=4}
  step decode-gpu-tests 130 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_paged_decode_mgpu.py \
    -k "gpu_sweep or gpu_tunings"
  step decode-kernel 60 "$PY" benchmarks/mgpu_decode.py --cases "B=128 ctx=640" --table-len "$MAX_MODEL_LEN" \
    --pool-pages 12500 --tunings "posm=1,sem=lane;$dt" --json-out "$RESULTS" --json-key decode_ab_kernel  # G 1's default
  for tuned in 0 1; do
    wrap=()
    ((tuned)) && wrap=(benchmarks/with_decode_tuning.py "$dt")
    step "decode-ab-throughput-$tuned" 110 "$PY" "${wrap[@]}" benchmarks/throughput.py --engine jpaged --model "$MODEL" \
      --run fixed:128 --max-model-len "$MAX_MODEL_LEN" --json-out "$RESULTS" --json-key "decode_ab_throughput_$tuned"
    step "decode-ab-latency-$tuned" 80 "$PY" "${wrap[@]}" benchmarks/latency.py --model "$MODEL" --no-warmup --iters 2 \
      --prefill-batch 0 --json-out "$RESULTS" --json-key "decode_ab_latency_$tuned"
  done
fi

if want stepcopies; then  # the engine as it is against its step compiled twice (benchmarks/with_step_copies.py), same call
  for copies in 1 2; do
    wrap=()
    ((copies > 1)) && wrap=(benchmarks/with_step_copies.py "$copies")
    step "step-copies-throughput-$copies" 200 "$PY" "${wrap[@]}" benchmarks/throughput.py --engine jpaged \
      --model "$MODEL" --run fixed:128 --run fixed:512 --max-model-len "$MAX_MODEL_LEN" --json-out "$RESULTS" \
      --json-key "step_copies_throughput_$copies"
    # --no-warmup: a copy's variants compile at their first call, so the second copy's TTFT includes a compile;
    # decode tok/s is the figure here
    step "step-copies-latency-$copies" 80 "$PY" "${wrap[@]}" benchmarks/latency.py --model "$MODEL" --no-warmup \
      --iters 2 --prefill-batch 0 --json-out "$RESULTS" --json-key "step_copies_latency_$copies"
  done
fi

if want pinnedinput; then  # the step's packed input as the engine passes it against pinned host memory, same call
  step input-copy 90 "$PY" benchmarks/input_copy.py --json-out "$RESULTS" --json-key input_copy
  for staged in 0 1; do
    wrap=()
    ((staged)) && wrap=(benchmarks/with_pinned_input.py)
    step "pinned-input-throughput-$staged" 200 "$PY" "${wrap[@]}" benchmarks/throughput.py --engine jpaged \
      --model "$MODEL" --run fixed:128 --run fixed:512 --max-model-len "$MAX_MODEL_LEN" --json-out "$RESULTS" \
      --json-key "pinned_input_throughput_$staged"
    step "pinned-input-latency-$staged" 80 "$PY" "${wrap[@]}" benchmarks/latency.py --model "$MODEL" \
      --no-warmup --iters 2 --prefill-batch 0 --json-out "$RESULTS" --json-key "pinned_input_latency_$staged"
  done
fi

if want mixtral; then  # issue 4: Mixtral-8x7B-shaped decode at fixed batch sizes, HF (grouped_mm experts) first
  # shellcheck disable=SC2086
  step mixtral-decode 420 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "$PY" benchmarks/decode.py --model mixtral-8x7b \
    --engine both --batches 1 16 64 256 --input-len 128 --output-len 32 --max-num-batched-tokens 2048 \
    --hf-timeout 200 --hf-experts grouped_mm $EXTRA_ENGINE_ARGS --json-out "$RESULTS" --json-key mixtral_decode
fi

echo "== done after $(($(date +%s) - START))s" | tee -a "$LOG"
timeout 60 "$PY" benchmarks/plot.py "$RESULTS" --out-dir "$OUT" 2>&1 | tee -a "$LOG"
timeout 30 "$PY" benchmarks/summary.py "$RESULTS" --out "$OUT/summary.md" 2>&1 | tee -a "$LOG"
