#!/usr/bin/env bash
# roadloop on a CUDA machine: do the GPU paths work, how fast are they, and what does a GPU buy the
# imitation policy?  Nothing here is part of the test suite (CI has no GPU); results go to docs/LOG.md.
#
# Usage:  bash benchmarks/gpu.sh bench     # CPU-vs-GPU parity (gpu_parity.py), bench vla / bench grpo on the GPU
#         bash benchmarks/gpu.sh smoke     # end to end on the GPU, small: imitation, GRPO (kill -9, --resume),
#                                          # RoaD, closed-loop eval
#         bash benchmarks/gpu.sh speed     # imitation samples/s: default fp32 / bf16, large bf16
#         bash benchmarks/gpu.sh check     # the three above
#         bash benchmarks/gpu.sh pipeline  # collect train-xl, imitation runs on the GPU (A: the default model
#                                          # longer, B: the large preset), open- and closed-loop evaluation of
#                                          # each; start it detached (setsid nohup ... &) on a remote machine
#         bash benchmarks/gpu.sh wait [S]  # wait up to S seconds for the pipeline, archive its results to $OUT
#
# Environment: DEV (cuda), W (work folder, /tmp/roadloop-gpu), OUT (results, $W/out), VAL (held-out
# demonstrations, e.g. `roadloop data collect --suites val,sumo-real-val`), CKPT (a trained VLA checkpoint
# for the parity check and the benches), SUMO_TRAIN / SUMO_VAL (saved sumo-real-train / -val suite folders
# (`roadloop scenarios build`), for machines without SUMO), PY (python), and the pipeline's knobs
# IL_A / IL_B (extra overrides of its two imitation runs), EPOCHS_A / EPOCHS_B, LIMIT_A / LIMIT_B (minutes),
# TRAIN_SUITES (collected for imitation), CL_SUITES (closed-loop evaluation).  QUICK=1 shrinks every step
# (a dry run of the script on a CPU: DEV=cpu QUICK=1).
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=${DEV:-cuda}
W=${W:-/tmp/roadloop-gpu}
OUT=${OUT:-$W/out}
PY=${PY:-python3}
VAL=${VAL:-}
CKPT=${CKPT:-}
if [ "${1:-}" != wait ] && { [ -z "$VAL" ] || [ -z "$CKPT" ]; }; then
  echo "give VAL (held-out demonstrations) and CKPT (a trained VLA checkpoint)" >&2; exit 2
fi
SUMO_TRAIN=${SUMO_TRAIN:-sumo-real-train}
SUMO_VAL=${SUMO_VAL:-sumo-real-val}
RL="$PY -m roadloop.cli"
TRAIN_SUITES=${TRAIN_SUITES:-train-xl,$SUMO_TRAIN}
CL_SUITES=${CL_SUITES:-val $SUMO_VAL}
if [ "${QUICK:-0}" = 1 ]; then VB=1,4; VBL=1; GS=(--scenarios 2 --group 2 --max-decisions 16); NP=16
else VB=1,16,64,256,1024; VBL=1,64,256; GS=(); NP=64; fi
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME CMD...: run, log to $W/NAME.log, record rc and seconds in $W/steps.tsv
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$W/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$W/steps.tsv"
  tail -n 25 "$W/$name.log"
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
  return $rc
}

collect_results() {  # steps.tsv + every log and JSON in one archive (few files travel back)
  cp "$W"/steps.tsv "$OUT"/ 2>/dev/null
  (cd "$W" && tar -czf "$OUT/results.tgz" ./*.log ./*.json ./*.tsv 2>/dev/null)
  ls -la "$OUT"
}

bench() {  # CPU-vs-GPU parity, decision latency / throughput, GRPO iteration cost
  nvidia-smi -L; $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  step parity $PY benchmarks/gpu_parity.py --data "$VAL" --policy "$CKPT" --device "$DEV" --n $NP \
    --json "$W/parity.json"
  step bench_vla $RL bench vla --policy "$CKPT" --device "$DEV" --batch $VB --json "$W/bench_vla.json"
  step bench_vla_large $RL bench vla --preset large --device "$DEV" --batch $VBL --repeats 5 \
    --json "$W/bench_vla_large.json"
  step bench_grpo $RL bench grpo --policy "$CKPT" --device "$DEV" --suites train "${GS[@]}" --json "$W/bench_grpo.json"
  step bench_grpo_big $RL bench grpo --policy "$CKPT" --device "$DEV" --suites train --scenarios 16 \
    --max-decisions 0 --minibatch 256 --trainable all --repeats 2 "${GS[@]}" --json "$W/bench_grpo_big.json"
}

smoke() {  # end to end on the GPU, small: imitation, GRPO (killed with -9, then --resume), RoaD, eval
  step smoke_collect $RL data collect --suites smoke --out "$W/smoke_demos" --max-steps 60
  step smoke_il $RL train il --data "$W/smoke_demos" --val-data "$W/smoke_demos" --out "$W/smoke_il" \
    model.preset=tiny epochs=2 batch_size=16 eval_every=0 eval_samples=16 final_eval_samples=16 \
    device="$DEV" track=false
  grpo_smoke=(train grpo --init "$W/smoke_il/final" --suites smoke --out "$W/smoke_grpo" iterations=6
              scenarios_per_iter=2 group_size=4 eval_every=0 ckpt_every=1 device="$DEV" track=false register=false)
  $RL "${grpo_smoke[@]}" > "$W/smoke_grpo_killed.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [ -e "$W/smoke_grpo/ckpt-00000002" ] && break; sleep 0.2; done
  kill -9 $pid; wait $pid
  echo "GRPO killed with -9 (rc $?) after iteration 2: $(ls "$W/smoke_grpo" | tr '\n' ' ')"
  step smoke_grpo $RL "${grpo_smoke[@]}" --resume
  step smoke_road $RL train road --init "$W/smoke_il/final" --suites smoke --out "$W/smoke_road" rounds=1 \
    scenarios_per_round=2 k=4 eval_every=0 device="$DEV" track=false register=false
  step smoke_eval $RL eval --policy "$W/smoke_grpo/final" --suite smoke --device "$DEV" --json "$W/smoke_eval.json"
  step smoke_eval_sumo $RL eval --policy "$CKPT" --suite "$SUMO_VAL" --device "$DEV" --json "$W/eval_sumo.json"
}

speed() {  # imitation samples/s on the GPU ($VAL as training data: a throughput, not a recipe)
  for v in "default fp32" "default bf16" "large bf16"; do
    set -- $v
    step "il_speed_$1_$2" $RL train il --data "$VAL" --val-data "$VAL" --out "$W/il_speed_$1_$2" device="$DEV" \
      model.preset=$1 precision=$2 epochs=3 time_limit_min=${SPEED_MIN:-1} eval_every=1000000 ckpt_every=100000 \
      final_eval_samples=256 track=false
  done
}

case "${1:-}" in
bench) bench; collect_results ;;
smoke) smoke; collect_results ;;
speed) speed; collect_results ;;
check) bench; smoke; speed; collect_results ;;
pipeline)
  EPOCHS_A=${EPOCHS_A:-12}; LIMIT_A=${LIMIT_A:-4.5}
  EPOCHS_B=${EPOCHS_B:-6}; LIMIT_B=${LIMIT_B:-5}
  step collect env ROADLOOP_THREADS=8 $RL data collect --suites "$TRAIN_SUITES" --out "$W/demos_xl"
  for run in ${RUNS:-A B}; do
    if [ $run = A ]; then extra="epochs=$EPOCHS_A time_limit_min=$LIMIT_A ${IL_A:-}"
    else extra="model.preset=large lr=5e-4 epochs=$EPOCHS_B time_limit_min=$LIMIT_B ${IL_B:-}"; fi
    # shellcheck disable=SC2086
    step il_$run $RL train il --data "$W/demos_xl" --val-data "$VAL" --out "$W/il_$run" device="$DEV" \
      track=false eval_every=1000000 ckpt_every=2000 $extra
    step ol_$run $RL eval-openloop --policy "$W/il_$run/final" --data "$VAL" --device "$DEV" --batch-size 256 \
      --json "$W/ol_$run.json"
  done
  for pol in ${RUNS:-A B} ref; do
    ck="$W/il_$pol/final"; [ $pol = ref ] && ck=$CKPT
    for s in $CL_SUITES; do
      step "cl_${pol}_$(basename "$s")" $RL eval --policy "$ck" --suite "$s" --device "$DEV" \
        --json "$W/cl_${pol}.$(basename "$s").json"
    done
  done
  echo PIPELINE_END
  ;;
wait)
  limit=${2:-540}
  while ! grep -q PIPELINE_END "$W/pipeline.log" 2>/dev/null && [ $SECONDS -lt "$limit" ]; do sleep 10; done
  tail -n 5 "$W/pipeline.log"; cat "$W/steps.tsv"
  collect_results
  ;;
*)
  echo "usage: bash benchmarks/gpu.sh bench|smoke|speed|check|pipeline|wait [seconds]" >&2; exit 2 ;;
esac
