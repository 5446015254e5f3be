#!/usr/bin/env bash
# Issue 24, rung 5: the runtime's default conditioning mode, decided from measurements.
#
# What ships: the embedded world model and the embedded projector on the default GGUF
# (SmolLM2-135M-Instruct Q4_1), modes none, text and prefix, scored by eval-conditioning:
#   - validation: 120 chitchat validation pairs, seed 0 (the choice is made here);
#   - out of domain: 300 chatterbot pairs after the 500 that rung 1 read (`--skip 500`, seed 0),
#     read once for this decision and reported whatever they are (skipped with OOD=0).
#
# The decision rule, written before either was read: `prefix` becomes the default where the
# llama backend runs a GGUF that a projector was made for (else `text`, the seed's) if
#   - on validation, `prefix - text` has its 95% upper bound below 0, and
#   - out of domain, `prefix - text` has its 95% lower bound at or below 0 (prefix is not
#     measurably worse there).
# Otherwise `text` stays the default everywhere.
#
# usage: scripts/rung5-modes.sh     (~5 + 10 min of scoring on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

tofy=target/release/tofy
out=docs/results/rung5
mkdir -p "$out"
score=(--seed 0 --modes none,text,prefix --json)
[ -f "$out/valid.json" ] || "$tofy" eval-conditioning data/chitchat_pairs.valid.tsv --n 120 \
    "${score[@]}" --per-pair "$out/valid-per-pair.tsv" >"$out/valid.json"
if [ "${OOD:-1}" = 1 ] && [ -f data/chatterbot_pairs.tsv ] && [ ! -f "$out/ood.json" ]; then
    "$tofy" eval-conditioning data/chatterbot_pairs.tsv --skip 500 --n 300 \
        "${score[@]}" --per-pair "$out/ood-per-pair.tsv" >"$out/ood.json"
fi
for split in valid ood; do
    if [ -f "$out/$split.json" ]; then scripts/eval-tables.sh "$out/$split.json"; fi
done
