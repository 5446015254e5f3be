#!/usr/bin/env bash
# The held-out report of docs/conditioning.md (issue 13): every mode of eval-conditioning on
# 500 held-out chitchat pairs (seed 0) with the shipped projector (the embedded one) and the
# shipped control map at the strength its validation search picked. About 45 minutes on 2 cores.
# Writes target/conditioning-report.json and prints the tables.
#
# usage: scripts/report-conditioning.sh [N] [CONTROL_STRENGTH]   (defaults 500, 0.02)
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-500}
strength=${2:-0.02}  # the pick of scripts/search-control.sh (models/control/README.md)
out=target/conditioning-report.json
target/release/tofy eval-conditioning data/chitchat_pairs.heldout.tsv --n "$n" --seed 0 \
    --control models/control/smollm2-135m-l10-20.safetensors --control-strength "$strength" \
    --json >"$out"
jq -r '"\(.n) pairs, \(.modes.none.tokens) reply tokens; \(.gguf); projector \(.projector)\n",
       "| mode | NLL per reply token |", "|---|---:|",
       (.modes | to_entries[] | "| \(.key) | \(.value.nll * 10000 | round / 10000) |"), "",
       "| difference | mean | 95% interval |", "|---|---:|---|",
       (.paired | to_entries[] | "| \(.key) | \(.value.mean * 10000 | round / 10000) | [\(.value.lo * 10000 | round / 10000), \(.value.hi * 10000 | round / 10000)] |")' "$out"
