#!/usr/bin/env bash
# The control map's search (issue 13, docs/conditioning.md), on the validation split only:
# fit-control on data/chitchat_pairs.fit.tsv, then eval-conditioning's cvec and
# mismatched_cvec modes on data/chitchat_pairs.valid.tsv at several strengths (and `none`
# once, for reference). The held-out pairs are never read here.
# One JSON line per point in target/control-search/results.jsonl, then a table.
#
# usage: scripts/search-control.sh [N_VALID_PAIRS] [N_FIT_PAIRS]   (defaults 120, 1500)
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-120}
n_fit=${2:-1500}
tofy=target/release/tofy
fit=data/chitchat_pairs.fit.tsv
valid=data/chitchat_pairs.valid.tsv
out=target/control-search
layers=10-20
map=$out/l${layers}_ridge10.safetensors
[ -f "$fit" ] && [ -f "$valid" ] || { echo "no $fit / $valid: run 'make data' first" >&2; exit 1; }
mkdir -p "$out"
: >"$out/results.jsonl"

[ -f "$map" ] || "$tofy" fit-control "$fit" --n "$n_fit" --ridge 10 --layers "$layers" --seed 0 \
    --out "$map" 2>>"$out/log.txt"

# score NAME MODES [args...]
score() {
    local name=$1 modes=$2
    shift 2
    "$tofy" eval-conditioning "$valid" --n "$n" --seed 0 --modes "$modes" --json "$@" \
        2>>"$out/log.txt" \
        | jq -c --arg name "$name" '{name: $name, n, modes: (.modes | map_values(.nll)),
              diff: .paired["cvec-mismatched_cvec"]}' \
        | tee -a "$out/results.jsonl"
}

score none none
# Strength 1 adds a typical reply's deviation (norm ~39 for SmolLM2 at layers 10-20) at each of
# the 11 layers; a first pass at 0.25 already raised the NLL from 4.62 to 6.21, so the grid
# starts far lower.
for s in 0.02 0.05 0.1; do
    score "strength$s" cvec,mismatched_cvec --control "$map" --control-strength "$s"
done

echo
echo "| point | validation cvec NLL | cvec - mismatched_cvec [95%] |"
echo "|---|---:|---|"
jq -r 'select(.diff) | "| \(.name) | \(.modes.cvec * 10000 | round / 10000) | \(.diff.mean * 10000 | round / 10000) [\(.diff.lo * 10000 | round / 10000), \(.diff.hi * 10000 | round / 10000)] |"' \
    "$out/results.jsonl"
jq -r 'select(.name == "none") | "none on the same pairs: \(.modes.none * 10000 | round / 10000)"' "$out/results.jsonl"
