#!/usr/bin/env bash
# The comparison behind the bundled TinyStories model (README, "Choosing the TinyStories
# model"): GPT at two widths and three BPE vocabularies against the AWD-LSTM at two
# widths, every run with the same wall-clock budget on one CPU thread and the same data
# (plain stories plus 30 % infilling examples). Each run's validation bits per character
# are in the table the sweep prints and in experiments/.
#   bash scripts/tinystories_sweep.sh [seconds per run, default 360]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-360}
PY=${PYTHON:-.venv/bin/python}
common=(training.max_time_s="$BUDGET" training.num_threads=1 training.eval_every=100 output.publish=null)
$PY -m training.sweep --config training/configs/tinystories_gpt.yaml --markdown \
    --vary tokenizer.vocab_size=2048,4096,8192 \
    name=ts-gpt-w192 model.n_embd=192 model.n_head=6 "${common[@]}"
$PY -m training.sweep --config training/configs/tinystories_gpt.yaml --markdown \
    --vary tokenizer.vocab_size=2048,4096,8192 \
    name=ts-gpt-w256 model.n_embd=256 model.n_head=8 "${common[@]}"
$PY -m training.sweep --config training/configs/bpe_lstm_tinystories.yaml --markdown \
    --vary model.n_hidden=512,1024 \
    name=ts-lstm tokenizer.vocab_size=4096 data.task=infill+lm data.infill_fraction=0.3 "${common[@]}"
