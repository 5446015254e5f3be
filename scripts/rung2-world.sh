#!/usr/bin/env bash
# Issue 24, rung 2: a world model that reads the conversation so far. The rung-0 recipe (dim 128,
# 2 layers, 4 heads, 8,000 tokens, bridge 256, lr 1e-3, seed 0) at max_seq 128 on the fit split's
# history twin (data/chitchat_pairs.fit.history.tsv, `make data`), 2,000 steps of 64: what the
# 2-core VM affords in one session (~2 s a step). The run checkpoints itself and resumes when
# started again (the log is appended to; `tee -i` leaves Ctrl-C to tofy, which writes its
# checkpoint). Output: target/world-hist/; log in
# docs/results/rung2/world-hist-train.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results/rung2
mkdir -p "$out"
bin=${TOFY:-target/release/tofy}
"$bin" train-world data/chitchat_pairs.fit.history.tsv 2000 64 128 128 2 4 8000 256 \
    --lr 1e-3 --seed 0 --out target/world-hist --log-every 100 --heldout data/chitchat_pairs.valid.history.tsv "$@" 2>&1 | tee -i -a "$out/world-hist-train.log"
