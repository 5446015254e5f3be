#!/usr/bin/env bash
# Issue 24, rung 1: the channel's capacity, and the projector recipe that trains to a plateau.
#
# Three projectors, trained the same way from the same start (rung 0's soft prompt: its constant
# rows, the weight at 0), on the same 2,000 fit pairs in the same batches (seed 1: rung 0's soft
# prompt took seed 0's first 150), AdamW lr 1e-4, batch 8; each scored every 20 steps on 64
# validation pairs and kept at its best, stopping after 3 scores without a new best or at 240
# steps (`tofy train-projector --valid`; an interrupted run resumes from OUT.run.safetensors):
#
#   soft:      the constant alone (--bias-only): the best constant steer, to its plateau;
#   oracle:    the weight reads bridge(encoder(true reply)) (--vectors oracle): what a perfect
#              prediction carries through K = 4 rows, the channel's capacity;
#   predicted: the weight reads the world model's prediction from the context.
#
# The weight reads its input centred on the training mean, so the constant lives in the bias
# alone, and it trains at the balanced rate (--weight-lr-scale 1: --lr over the inputs' mean L1
# norm, at which the weight moves a row no faster than the bias does). At --lr itself the first
# oracle run's validation NLL rose from 3.81 to 4.35 in 20 steps; a probe of 20 oracle steps
# (scripts/rung1-probe.sh, docs/results/rung1/weight-rate-probe.log) gave 3.831 at scale 1 and
# 4.024 at scale 10 on the validation pairs, so scale 1 it is. The world model is rung 0's fit-split retrain (target/world-fit, `tofy train-world
# data/chitchat_pairs.fit.tsv 4000 64 128 32 2 4 8000 256 --lr 1e-3 --seed 0 --out
# target/world-fit`): it never saw a validation conversation, so the plateau is chosen cleanly.
#
# Then validation (120 pairs, seed 0) and one held-out read: the 500 seed-0 pairs after the 500
# that rung 0 and earlier read (`--skip 500`), modes prefix, mismatched_prefix, soft_prompt,
# oracle, mismatched_oracle. Skipped with HELDOUT=0. Then the same modes on 500 pairs of the
# out-of-domain set (`make data-ood`, data/chatterbot_pairs.tsv, seed 0), read once, reported
# whatever they are (skipped with OOD=0 or without the set).
#
# The decision rule, written before any of these numbers was read: rung 1 changes no default
# (its projector reads the fit-split world model, which is not embedded; a world model and its
# projector are adopted together at rung 4). It reports, on held-out:
#   - capacity: `oracle - soft_prompt`. If its 95% upper bound is not below 0, K = 4 rows of the
#     encoder's reply latent carry nothing a constant does not, and rung 2 must change what is
#     predicted, not only how well;
#   - the recipe: `prefix - soft_prompt` and `prefix - mismatched_prefix`, against rung 0's
#     +0.018 and -0.018;
#   - the fraction of the capacity reached, (soft_prompt - prefix) / (soft_prompt - oracle).
#
# usage: scripts/rung1-capacity.sh     (up to ~3 x 35 min of training, 6 + 21 min of scoring, 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

tofy=target/release/tofy
out=docs/results/rung1
mkdir -p "$out" target/rung1
[ -f data/chitchat_pairs.fit.tsv ] || { echo "no data/chitchat_pairs.fit.tsv: run 'make data' first" >&2; exit 1; }
world=(--world target/world-fit/model_world_1.51M.safetensors --vocab target/world-fit/vocab_world.txt)
[ -f target/world-fit/model_world_1.51M.safetensors ] || {
    echo "no target/world-fit: train it first (the command above, ~40 min)" >&2; exit 1; }
start=models/projector/smollm2-135m-soft-prompt.safetensors
train=(train-projector data/chitchat_pairs.fit.tsv --n 2000 --steps 240 --batch 8 --lr 1e-4
       --seed 1 --log-every 20 --valid data/chitchat_pairs.valid.tsv --valid-n 64
       --eval-every 20 --patience 3 --constant "$start" --weight-lr-scale 1
       --projector models/projector/smollm2-135m-fitted.safetensors "${world[@]}")
soft=target/rung1/soft.safetensors
oracle=target/rung1/oracle.safetensors
predicted=target/rung1/predicted.safetensors

for run in soft oracle predicted; do
    case $run in
        soft) extra=(--bias-only) ;;
        oracle) extra=(--vectors oracle) ;;
        predicted) extra=(--vectors predicted) ;;
    esac
    [ -f "target/rung1/$run.done" ] && continue
    "$tofy" "${train[@]}" "${extra[@]}" --out "target/rung1/$run.safetensors" 2>&1 \
        | tee -a "$out/$run-train.log"
    touch "target/rung1/$run.done"
done
# The constant later rungs must beat (models/projector/README.md).
cmp -s "$soft" models/projector/smollm2-135m-soft-prompt-rung1.safetensors ||
    cp "$soft" models/projector/smollm2-135m-soft-prompt-rung1.safetensors

modes=prefix,mismatched_prefix,soft_prompt,oracle,mismatched_oracle
score=(--seed 0 --modes "$modes" --projector "$predicted" --soft-prompt "$soft"
       --oracle-projector "$oracle" "${world[@]}" --json)
[ -f "$out/valid.json" ] || "$tofy" eval-conditioning data/chitchat_pairs.valid.tsv --n 120 \
    "${score[@]}" --per-pair "$out/valid-per-pair.tsv" >"$out/valid.json"

if [ "${HELDOUT:-1}" = 1 ] && [ ! -f "$out/heldout.json" ]; then
    "$tofy" eval-conditioning data/chitchat_pairs.heldout.tsv --skip 500 --n 500 \
        "${score[@]}" --per-pair "$out/heldout-per-pair.tsv" >"$out/heldout.json"
fi

if [ "${OOD:-1}" = 1 ] && [ -f data/chatterbot_pairs.tsv ] && [ ! -f "$out/ood.json" ]; then
    "$tofy" eval-conditioning data/chatterbot_pairs.tsv --n 500 \
        "${score[@]}" --per-pair "$out/ood-per-pair.tsv" >"$out/ood.json"
fi

for split in valid heldout ood; do
    [ -f "$out/$split.json" ] || continue
    jq -r '"\(input_filename): \(.n) pairs from \(.conversations) conversations (\(.bootstrap) bootstrap), \(.modes.prefix.tokens) reply tokens\n",
           (.modes | to_entries[] | "| \(.key) | \(.value.nll * 10000 | round / 10000) |"), "",
           (.paired | to_entries[] | "| \(.key) | \(.value.mean * 10000 | round / 10000) | [\(.value.lo * 10000 | round / 10000), \(.value.hi * 10000 | round / 10000)] |"),
           (if .capacity_reached then "capacity reached: \(.capacity_reached.mean * 1000 | round / 1000) [\(.capacity_reached.lo * 1000 | round / 1000), \(.capacity_reached.hi * 1000 | round / 1000)]"
            else "capacity reached: none (the oracle does not beat the soft prompt)" end)' \
        "$out/$split.json"
done
