#!/usr/bin/env bash
# The runs the freeze decision still lacks, one after another, each kept as soon as it ends (--reuse skips those
# already in benchmarks/results/decision/runs, so the queue can be stopped and restarted at any point). Each run
# needs the machine to itself: its wall-clock is the measurement. Then `python benchmarks/decision.py`.
#
#   bash benchmarks/queue_frontier.sh              # every stage
#   STAGES="frontier" bash benchmarks/queue_frontier.sh
#
# Stages: frontier (full fine-tuning at 1 and 2 epochs with their own schedule, and at the protocol's epochs with
# learning rates 1e-4 and 2e-4, on every workload and seed), speeches (the convention-speeches workload's protocol
# at its 10 epochs), shareable (the default policy with `shareable_prefix=true` beside the plain one: alone, with
# the active blocks' rate re-warmed after each restore, and at the tuned rate), approaches (the approaches aimed at
# the frontier: the default with larger or re-warmed steps for what still trains, and freezing at the workload's
# best full fine-tuning rate where the frontier stage has found one). WORKLOADS picks workloads.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-"frontier speeches shareable approaches"}
WORKLOADS=${WORKLOADS:-"rt debates smollm2 speeches"}
SEEDS=${SEEDS:-"42 1 2"}
R="--runs-dir benchmarks/results/decision/runs --reuse --skip-ideal"
FRONTIER=(full:epochs=1 full:epochs=2 full:learning_rate=1e-4 full:learning_rate=2e-4)
SPEECHES_FRONTIER=(full:epochs=1 full:epochs=2 full:epochs=3 full:epochs=5 full:learning_rate=1e-4 full:learning_rate=2e-4)
B3='cache:budget:target_speedup=3.0,budget_plan="switch"'
APPROACHES=(cache:gradnorm:active_lr_scale=3.0 cache:gradnorm:active_lr_rewarm=true)
# the best 3-epoch full fine-tuning rate of the frontier stage (mean of 3 seeds), where it is not the protocol's
# (Rotten Tomatoes and SmolLM2: 5e-5 beat 2e-4, and on SmolLM2 1e-4; speeches: 2e-4 by 0.9, within noise)
declare -A BEST_RATE=([debates]=2e-4)

# workload -> its flags (the same as the committed runs of benchmarks/results/decision/runs)
declare -A FLAGS=(
  [rt]=""
  [debates]="--dataset presidential_debates --batch-size 16 --max-length 64"
  [smollm2]="--task causal_lm --max-train-samples 480 --max-eval-samples 200 --max-length 64"
  [speeches]="--dataset convention_speeches --batch-size 8 --max-length 256"
)

run() {  # workload seed methods...
  local workload=$1 seed=$2
  shift 2
  # shellcheck disable=SC2086  # FLAGS and R are word lists
  "$PYTHON" benchmarks/finetune.py $R --seed "$seed" --name "decision/${workload}_seed${seed}" ${FLAGS[$workload]} \
      --methods "$@"
}

wanted() { [[ " $WORKLOADS " == *" $1 "* ]]; }

for seed in $SEEDS; do
  if [[ " $STAGES " == *" frontier "* ]]; then
    for workload in rt debates smollm2; do
      wanted "$workload" && run "$workload" "$seed" full "${FRONTIER[@]}"
    done
  fi
  if [[ " $STAGES " == *" speeches "* ]] && wanted speeches; then
    run speeches "$seed" full "${SPEECHES_FRONTIER[@]}" cache:gradnorm "$B3" "$B3,active_lr_scale=3.0" \
        cache:fixed cache:schedule lora
  fi
  if [[ " $STAGES " == *" shareable "* ]]; then
    for workload in $WORKLOADS; do
      rate=${BEST_RATE[$workload]:-}
      tuned=()
      [[ -n $rate ]] && tuned=("cache:gradnorm:shareable_prefix=true,learning_rate=$rate")
      run "$workload" "$seed" cache:gradnorm cache:gradnorm:shareable_prefix=true \
          cache:gradnorm:shareable_prefix=true,active_lr_rewarm=true "${tuned[@]}"
    done
  fi
  if [[ " $STAGES " == *" approaches "* ]]; then
    for workload in $WORKLOADS; do
      tuned=()
      rate=${BEST_RATE[$workload]:-}
      [[ -n $rate ]] && tuned=("cache:gradnorm:learning_rate=$rate" "$B3,learning_rate=$rate"
                               "$B3,active_lr_scale=3.0,learning_rate=$rate" "cache:schedule:learning_rate=$rate")
      run "$workload" "$seed" "${APPROACHES[@]}" "${tuned[@]}"
    done
  fi
done
"$PYTHON" benchmarks/decision.py
