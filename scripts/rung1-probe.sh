#!/usr/bin/env bash
# Issue 24, rung 1: the weight's learning rate, chosen on validation before the oracle and
# predicted runs of scripts/rung1-capacity.sh: 20 oracle steps at --weight-lr-scale 1 and 10 (the
# balanced rate and ten times it), each scored on the 64 validation pairs at step 20.
# Output: docs/results/rung1/weight-rate-probe.log. About 8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/rung1 docs/results/rung1
for scale in 1 10; do
    target/release/tofy train-projector data/chitchat_pairs.fit.tsv --n 2000 --steps 20 --batch 8 \
        --lr 1e-4 --seed 1 --log-every 20 --valid data/chitchat_pairs.valid.tsv --valid-n 64 \
        --eval-every 20 --patience 3 --constant models/projector/smollm2-135m-soft-prompt.safetensors \
        --projector models/projector/smollm2-135m-fitted.safetensors \
        --world target/world-fit/model_world_1.51M.safetensors --vocab target/world-fit/vocab_world.txt \
        --vectors oracle --weight-lr-scale "$scale" --out "target/rung1/probe-oracle-$scale.safetensors" 2>&1 \
        | sed "s/^/[scale $scale] /"
done | tee docs/results/rung1/weight-rate-probe.log
