#!/usr/bin/env bash
# Recipes for the bundled TinyStories GPT at one budget (issue 35, benchmarks/README.md,
# "Recipes at equal budget"): the bundled model's size, data and schedule, trained with
# AdamW or Muon (training.optimizer) and with its dropout or twice it. Every run has the same
# number of optimizer steps on one CPU thread, so a busy machine changes the times the
# table prints, not the models; validation bits per character are in the table the sweep
# prints and in experiments/.
#   bash scripts/tinystories_recipes.sh [steps per run, default 450]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-450}
PY=${PYTHON:-.venv/bin/python}
$PY -m training.sweep --config training/configs/tinystories_gpt.yaml --markdown \
    --vary training.optimizer=adamw,muon --vary model.dropout=0.1,0.2 \
    name=ts-recipes training.max_steps="$STEPS" training.warmup_steps=50 training.num_threads=1 \
    training.eval_every=150 training.eval_batches=20 training.save_every=150 output.publish=null
