#!/usr/bin/env bash
# Issue 24, rung 0: the honest baselines for the world model's prefix steer.
#
#   1. A soft prompt: `tofy train-projector --bias-only`, the same data, start, steps, batch and
#      learning rate as the shipped trained projector (scripts/train-projector.sh: 2,000 fit
#      pairs, 150 AdamW steps of 8, lr 1e-4, from the fitted projector), but the weight fixed at
#      0: one set of rows for every prompt, starting at the mean vector's rows.
#   2. Validation (120 pairs of chitchat_pairs.valid.tsv, seed 0): none, instruction, prefix,
#      mismatched_prefix, mean_prefix, soft_prompt; per-pair scores kept.
#   3. The held-out read, once (500 pairs of chitchat_pairs.heldout.tsv, seed 0), the same modes,
#      conversation bootstrap; per-pair scores kept. Skipped with HELDOUT=0.
#
# The decision rule, written before any read of these numbers: rung 0 changes no default. It
# measures the goal's first line with today's models: if the held-out `prefix - soft_prompt`
# interval's upper bound is below 0, the world model (with the shipped projector) beats the best
# constant steer; otherwise it does not, and the later rungs have to make it. Either way the
# figures go into docs/conditioning.md with this read in its ledger.
#
# usage: scripts/rung0-baselines.sh      (about 25 min of training + 6 + 25 min of scoring, 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

tofy=target/release/tofy
out=docs/results/rung0
mkdir -p "$out"
[ -f data/chitchat_pairs.fit.tsv ] || { echo "no data/chitchat_pairs.fit.tsv: run 'make data' first" >&2; exit 1; }
[ -f data/chitchat_pairs.heldout.conversations ] || { echo "no conversation sidecars: run 'make -B data'" >&2; exit 1; }
modes=none,instruction,prefix,mismatched_prefix,mean_prefix,soft_prompt
# Kept in models/projector/ (not compiled in): the baseline later rungs compare against.
soft=models/projector/smollm2-135m-soft-prompt.safetensors

if [ ! -f "$soft" ]; then
    mkdir -p target/rung0
    "$tofy" train-projector data/chitchat_pairs.fit.tsv --n 2000 --steps 150 --batch 8 --lr 1e-4 \
        --seed 0 --log-every 10 --bias-only \
        --projector models/projector/smollm2-135m-fitted.safetensors \
        --out target/rung0/soft-prompt.safetensors 2>&1 | tee "$out/soft-prompt-train.log"
    cp target/rung0/soft-prompt.safetensors "$soft"
fi

"$tofy" eval-conditioning data/chitchat_pairs.valid.tsv --n 120 --seed 0 --modes "$modes" \
    --soft-prompt "$soft" --per-pair "$out/valid-per-pair.tsv" --json >"$out/valid.json"

if [ "${HELDOUT:-1}" = 1 ]; then
    "$tofy" eval-conditioning data/chitchat_pairs.heldout.tsv --n 500 --seed 0 --modes "$modes" \
        --soft-prompt "$soft" --per-pair "$out/heldout-per-pair.tsv" --json >"$out/heldout.json"
fi

for split in valid heldout; do
    if [ -f "$out/$split.json" ]; then scripts/eval-tables.sh "$out/$split.json"; fi
done
