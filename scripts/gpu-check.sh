#!/usr/bin/env bash
# The GPU check (issue 15): run on a machine with an NVIDIA GPU, from the archive `make cuda`
# packs (docs/gpu.md says how to carry it):
#
#   tar xJf tofy-cuda.tar.xz && tofy-cuda/scripts/gpu-check.sh
#
# Needs the NVIDIA driver, CUDA 13's cuBLAS and NVRTC (found in the usual places, or put their
# lib/ on LD_LIBRARY_PATH), python3 with torch, and models/SmolLM2-135M-Instruct.Q4_1.gguf in the
# archive folder (or TOFY_GGUF). Writes summary.md, summary.jsonl and progress.log to $OUT (or
# ./gpu-check-out) as it goes, and at the end logs.tar.gz with every log and dump (at most 8
# files come back from the device tool's $OUT). Checks, in this order:
#   1. the world model on CUDA vs the CPU, max relative error <= 1e-4, on the seed-format test
#      fixture, the embedded default and a seed-sized random checkpoint, at batch 1, 7 and 32,
#      with CUDA graphs and without; and both against PyTorch float64 (scripts/world_ref.py);
#   2. infer-agent at JEPA_DECODER_NGL=99: llama.cpp's log shows the layers offloaded, and the
#      greedy reply's first 32 tokens against the CPU's (where they first differ, if they do);
#   3. world-model latency at batch 1 and 32, tofy vs PyTorch eager and CUDA-graphed;
#   4. decode tok/s at NGL 99, tofy vs llama-bench (same llama.cpp libraries), same GGUF;
#   5. tofy serve vs llama-server, all layers offloaded, 1/8/32 streams: aggregate tok/s, TTFT.
# A check that fails is recorded and the next one runs. Exit status 1 if any check failed.
# GPU_CHECK_PARTS="2 4" runs only those checks; GPU_CHECK_STREAMS (default 1,8,32) and
# GPU_CHECK_MAX_TOKENS (128) shape check 5, and GPU_CHECK_DEVICE (cuda) the device of check 1's
# "cuda" runs, for a dry run on a CPU.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
final=${OUT:-$PWD/gpu-check-out}
out=$(mktemp -d /tmp/gpu-check.XXXXXX) # logs and dumps; packed into $final/logs.tar.gz
mkdir -p "$final"
tofy=$root/bin/tofy
peers=$root/peers
gguf=${TOFY_GGUF:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ref=$root/scripts/world_ref.py
export TOFY_KERNEL_CACHE=$out/kernel-cache PYTHONUNBUFFERED=1
unset JEPA_DECODER_MODEL JEPA_DECODER_NGL JEPA_DECODER_TEMP TOFY_DEVICE TOFY_CUDA_GRAPHS
start=$(date +%s)
failed=0

say() { echo "== $* ($(($(date +%s) - start)) s)" | tee -a "$final/progress.log"; }
# t CMD...: CMD with a time limit, so that one hang cannot eat the device call (which would
# lose the summary and the logs). 180 s is far above any single step on an H100/H200.
t() { timeout 180 "$@"; }
# part N: whether check N is to run (GPU_CHECK_PARTS, default all: "1 2 3 4 5").
part() { [[ " ${GPU_CHECK_PARTS:-1 2 3 4 5} " == *" $1 "* ]]; }
# row CHECK RESULT FIGURES: one line of the summary.
row() {
    printf '| %s | %s | %s |\n' "$1" "$2" "$3" >>"$final/summary.md"
    [ "$2" = FAIL ] && failed=1
    return 0
}

# CUDA's libraries: the driver's, and cuBLAS/NVRTC/cudart wherever this image keeps them.
for lib in libcublas.so.13 libnvrtc.so.13 libcudart.so.13; do
    ldconfig -p | grep -q "$lib" && continue
    dir=$( (ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib 2>/dev/null
            python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null) |
           while read -r d; do [ -e "$d/$lib" ] && echo "$d" && break; done)
    [ -n "$dir" ] && export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
    echo "- CUDA (nvcc): $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p'); torch $(python3 -c 'import torch; print(torch.__version__)' 2>&1)"
    echo "- CPU: $(nproc) x $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)"
    echo "- tofy: $("$tofy" --version 2>&1), archive $(cat "$root/BUILD-INFO" 2>/dev/null | head -1)"
    echo
    echo "| check | result | figures |"
    echo "| --- | --- | --- |"
} >"$final/summary.md"
"$tofy" doctor >"$out/doctor.txt" 2>&1
sed -n 's/^/    /p' "$out/doctor.txt" >>"$final/progress.log"

# The world models of checks 1 and 3.
if part 1 || part 3; then
fixture=$root/tests/fixtures/seed-tiny
vocab_rows=$(python3 - "$root/models/world/model_world_1.51M.safetensors" <<'EOF'
import json, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]
print(json.loads(f.read(n))["encoder.embed.weight"]["shape"][0])
EOF
)
# The random checkpoint's vocab: the embedded default's, whose model has exactly that many rows.
python3 "$ref" random "$out/seed-size.safetensors" --vocab-size "$vocab_rows" >"$out/random.log" 2>&1 ||
    row "random seed-size checkpoint" FAIL "$(tail -1 "$out/random.log")"
declare -A world_args=(
    [fixture]="$fixture/model_world_tiny.safetensors $fixture/vocab_world.txt --heads 4 --max-seq 16"
    [default]=""
    [seed-size]="$out/seed-size.safetensors $root/models/world/vocab_world.txt"
)
declare -A ref_args=(
    [fixture]="$fixture/model_world_tiny.safetensors --heads 4 --max-seq 16"
    [default]="$root/models/world/model_world_1.51M.safetensors"
    [seed-size]="$out/seed-size.safetensors"
)
fi

# ---------------------------------------------------------------- 1. world-model parity
if part 1; then
say "1. world model: CUDA vs CPU vs PyTorch"
for name in fixture default seed-size; do
    # shellcheck disable=SC2086
    set -- ${world_args[$name]}
    gpu=${GPU_CHECK_DEVICE:-cuda}
    for run in cpu:cpu "cuda:$gpu" "cuda-eager:$gpu"; do
        label=${run%%:*}
        graphs=1; [ "$label" = cuda-eager ] && graphs=0
        TOFY_CUDA_GRAPHS=$graphs t "$tofy" bench-world "$@" --device "${run#*:}" --batch 1,7,32 --iters 3 \
            --dump "$out/world-$name-$label.json" >>"$out/world-parity.log" 2>&1 ||
            row "world $name on $label" FAIL "bench-world failed: $(tail -1 "$out/world-parity.log")"
    done
    # A comparison that cannot finish (a dump missing, or cut short) is a failure, and so is
    # a batch size without its row: the summary below judges only complete sets.
    for label in cuda cuda-eager; do
        t python3 "$ref" compare "$out/world-$name-$label.json" "$out/world-$name-cpu.json" \
            >"$out/world-$name-$label-vs-cpu.jsonl" 2>>"$out/world-parity.log" ||
            row "world $name, $label vs cpu" FAIL "compare failed: $(tail -1 "$out/world-parity.log")"
    done
    # shellcheck disable=SC2086
    t python3 "$ref" parity ${ref_args[$name]} "$out/world-$name-cpu.json" "$out/world-$name-cuda.json" \
        >"$out/world-$name-vs-torch.jsonl" 2>>"$out/world-parity.log" ||
        row "world $name vs torch" FAIL "parity failed: $(tail -1 "$out/world-parity.log")"
    python3 - "$name" "$out" >>"$final/summary.md" <<'EOF'
import json, math, sys
name, out = sys.argv[1], sys.argv[2]
def rows_of(path):
    try:
        return [json.loads(l) for l in open(path) if l.strip()]
    except OSError:
        return []
def err_of(r):
    e = max(r["conditioning"], r["state"], r["next"])
    return e if math.isfinite(e) else float("inf")
figures, ok = [], True
for label in ("cuda", "cuda-eager"):
    rows = rows_of(f"{out}/world-{name}-{label}-vs-cpu.jsonl")
    err, b = max(((err_of(r), r["batch"]) for r in rows), default=(float("inf"), 0))
    figures.append(f"{label} vs cpu {err:.2e} (worst at batch {b})")
    ok &= sorted(r["batch"] for r in rows) == [1, 7, 32] and err <= 1e-4
rows = rows_of(f"{out}/world-{name}-vs-torch.jsonl")
for dev in ("cpu", "cuda"):
    mine = [r for r in rows if ("-" + dev + ".json") in r["dump"]]
    err = max((err_of(r) for r in mine), default=float("inf"))
    figures.append(f"{dev} vs torch f64 {err:.2e}")
    ok &= sorted(r["batch"] for r in mine) == [1, 7, 32] and err <= 1e-4
print(f"| world parity, {name}, batch 1/7/32 | {'PASS' if ok else 'FAIL'} | {'; '.join(figures)} |")
EOF
done
grep -q "world parity.*FAIL" "$final/summary.md" && failed=1

fi

# ---------------------------------------------------------------- 2. offload and the greedy reply
if part 2; then
say "2. infer-agent at NGL 99 vs the CPU"
prompt="write a short gpu recommendation"
agent() { # label env...
    local label=$1; shift
    env "$@" JEPA_DECODER_MODEL="$gguf" JEPA_DECODER_TEMP=0 TOFY_LLAMA_LOG=1 \
        timeout 180 "$tofy" infer-agent "$prompt" --max-new-tokens 32 --json >"$out/agent-$label.json" 2>"$out/agent-$label.log"
}
agent gpu JEPA_DECODER_NGL=99
agent cpu JEPA_DECODER_NGL=0 CUDA_VISIBLE_DEVICES= TOFY_DEVICE=cpu
# llama.cpp says "offloaded N/N layers" even when no GPU took them: the CUDA0 buffer is the proof.
offload="$(grep -o 'offloaded [0-9]*/[0-9]* layers to GPU' "$out/agent-gpu.log" | tail -1)"
cuda_buffer="$(grep -o 'CUDA0 model buffer size = *[0-9.]* MiB' "$out/agent-gpu.log" | tail -1)"
python3 - "$out" "$offload" "$cuda_buffer" >>"$final/summary.md" <<'EOF'
import json, sys
out, offload, cuda_buffer = sys.argv[1], sys.argv[2], " ".join(sys.argv[3].split())
try:
    gpu, cpu = (json.load(open(f"{out}/agent-{d}.json")) for d in ("gpu", "cpu"))
except Exception as e:
    print(f"| infer-agent NGL 99 | FAIL | no reply: {e} |"); sys.exit()
a, b = gpu["reply"], cpu["reply"]
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
same = a == b
where = "identical" if same else f"first differ at character {n}: {a[max(0, n - 20):n + 20]!r} vs {b[max(0, n - 20):n + 20]!r}"
ok = bool(offload) and bool(cuda_buffer) and gpu["completion_tokens"] > 0
print(f"| infer-agent NGL 99 | {'PASS' if ok else 'FAIL'} | {offload or 'no offload line in the log'}, "
      f"{cuda_buffer or 'no CUDA0 model buffer in the log'}; "
      f"{gpu['completion_tokens']} tokens, GPU vs CPU greedy replies {where}; "
      f"decode {gpu['timings'].get('decode_tokens_per_second') or 0:.0f} tok/s GPU, {cpu['timings'].get('decode_tokens_per_second') or 0:.0f} CPU |")
EOF
fi

# ---------------------------------------------------------------- 3. world-model latency
if part 3; then
say "3. world-model latency vs PyTorch"
for name in default seed-size; do
    # shellcheck disable=SC2086
    set -- ${world_args[$name]}
    # Three rounds, tofy and PyTorch taking turns to go first; the ratios are medians of the
    # per-round ratios.
    for round in 1 2 3; do
        runs=(tofy torch)
        [ $((round % 2)) = 0 ] && runs=(torch tofy)
        for who in "${runs[@]}"; do
            if [ "$who" = tofy ]; then
                t "$tofy" bench-world "$@" --device cuda --batch 1,32 --iters 300 \
                    >"$out/latency-$name-tofy-$round.jsonl" 2>>"$out/latency.log"
            else
                # shellcheck disable=SC2086
                t python3 "$ref" bench ${ref_args[$name]} --batch 1,32 --iters 300 \
                    >"$out/latency-$name-torch-$round.jsonl" 2>>"$out/latency.log"
            fi
        done
    done
    python3 - "$name" "$out" >>"$final/summary.md" <<'EOF'
import json, statistics, sys
name, out = sys.argv[1], sys.argv[2]
def rows_of(path):
    try:
        return [json.loads(l) for l in open(path) if l.strip()]
    except OSError:
        return []
for b in (1, 32):
    rounds = []
    for r in (1, 2, 3):
        ours = {x["batch"]: x["median_ms"] for x in rows_of(f"{out}/latency-{name}-tofy-{r}.jsonl")}
        peer = {(x["batch"], x["peer"].split()[-1]): x["median_ms"]
                for x in rows_of(f"{out}/latency-{name}-torch-{r}.jsonl")}
        if b in ours and (b, "eager") in peer and (b, "cuda-graph") in peer:
            rounds.append((ours[b], peer[(b, "eager")], peer[(b, "cuda-graph")]))
    if len(rounds) < 3:
        print(f"| world latency, {name}, batch {b} | FAIL | {len(rounds)} of 3 rounds have figures (see latency.log) |")
        continue
    med = lambda xs: statistics.median(xs)
    t, e, g = (med(col) for col in zip(*rounds))
    re, rg = med([x[0] / x[1] for x in rounds]), med([x[0] / x[2] for x in rounds])
    ok = re <= 0.5 and rg <= 1.0
    print(f"| world latency, {name}, batch {b} | {'PASS' if ok else 'MISS'} | tofy {t:.3f} ms; torch eager {e:.3f} ms "
          f"({re:.2f}x, target <= 0.5x); torch CUDA graph {g:.3f} ms ({rg:.2f}x, target <= 1.0x); "
          f"medians of 3 interleaved rounds |")
EOF
done
fi

# ---------------------------------------------------------------- 4. decode vs llama-bench
if part 4; then
say "4. decode tok/s vs llama-bench"
long="Write a long story about a lighthouse keeper who finds a message in a bottle."
for round in 1 2 3; do
    JEPA_DECODER_MODEL=$gguf JEPA_DECODER_NGL=99 JEPA_DECODER_TEMP=0 t "$tofy" infer-agent "$long" \
        --max-new-tokens 256 --json >"$out/decode-tofy-$round.json" 2>>"$out/decode.log"
    t "$peers/llama-bench" -m "$gguf" -ngl 99 -p 0 -n 128 -r 3 -o json >"$out/decode-llama-bench-$round.json" 2>>"$out/decode.log"
done
python3 - "$out" >>"$final/summary.md" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
try:
    ours = [json.load(open(f"{out}/decode-tofy-{r}.json")) for r in (1, 2, 3)]
    peer = [json.load(open(f"{out}/decode-llama-bench-{r}.json"))[0]["avg_ts"] for r in (1, 2, 3)]
    rates = [o["timings"]["decode_tokens_per_second"] for o in ours]
    ratios = [a / b for a, b in zip(rates, peer)]
    r = statistics.median(ratios)
    print(f"| decode NGL 99 | {'PASS' if r >= 0.97 else 'MISS'} | tofy {statistics.median(rates):.0f} tok/s "
          f"({ours[0]['completion_tokens']} tokens), llama-bench tg128 {statistics.median(peer):.0f} tok/s; "
          f"ratio {r:.3f} (median of 3 interleaved rounds, target >= 0.97) |")
except Exception as e:
    print(f"| decode NGL 99 | FAIL | {type(e).__name__}: {e} |")
EOF
fi

# ---------------------------------------------------------------- 5. serving vs llama-server
if part 5; then
say "5. tofy serve vs llama-server, 1/8/32 streams"
port=18490
pid=
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=; fi; }
trap stop EXIT
ready() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
serve_tofy() {
    JEPA_DECODER_MODEL=$gguf JEPA_DECODER_NGL=99 "$tofy" serve "127.0.0.1:$port" --parallel 32 \
        --ctx 4096 >>"$out/serve-tofy.log" 2>&1 &
    pid=$!
}
serve_llama() {
    "$peers/llama-server" -m "$gguf" -ngl 99 -np 32 -c $((4096 * 32)) --host 127.0.0.1 \
        --port "$port" >>"$out/serve-llama-server.log" 2>&1 &
    pid=$!
}
rm -f "$out/serve.jsonl"
streams=${GPU_CHECK_STREAMS:-1,8,32}
# "chat": what users send (tofy adds its conditioning message, llama-server nothing); "same
# tokens": one ChatML text with a conditioning-like system message through /v1/completions, so
# both servers evaluate exactly the same tokens (scripts/bench-server.sh's two modes).
system="You are Tofy, a helpful assistant. A world model read the user's message and predicted a latent condition for your reply. Use the latent condition to guide the tone, depth and focus of your reply; never mention it or its numbers. Latent condition: chunks=[0.188,0.054,0.099,-0.045,0.000,-0.096,0.031,0.049]"
# Three rounds, the servers taking turns to go first; ratios are medians of the per-round ratios.
for round in 1 2 3; do
  servers=(tofy llama)
  [ $((round % 2)) = 0 ] && servers=(llama tofy)
  for server in "${servers[@]}"; do
    "serve_$server"
    if ready; then
        for mode in chat same; do
            extra=()
            [ "$mode" = same ] && extra=(--raw-system "$system")
            t python3 "$root/scripts/bench-server.py" --base-url "http://127.0.0.1:$port" \
                --concurrency "$streams" --requests-per-stream 2 --timeout 60 \
                --max-tokens "${GPU_CHECK_MAX_TOKENS:-128}" --label "$server $mode $round" \
                --out "$out/serve.jsonl" "${extra[@]}" >>"$out/serve.log" 2>&1
        done
    else
        echo "$server did not start" >>"$out/serve.log"
    fi
    stop
  done
done
python3 - "$out" "$streams" >>"$final/summary.md" <<'EOF'
import json, statistics, sys
out, streams = sys.argv[1], [int(c) for c in sys.argv[2].split(",")]
try:
    rows = {(r["label"], r["concurrency"]): r for r in map(json.loads, open(f"{out}/serve.jsonl"))}
except OSError as e:
    rows = {}
med = statistics.median
for mode, name in (("same", "same tokens"), ("chat", "chat")):
    for c in streams:
        pairs = [(rows.get((f"tofy {mode} {k}", c)), rows.get((f"llama {mode} {k}", c))) for k in (1, 2, 3)]
        if not all(a and b for a, b in pairs):
            print(f"| serve ({name}), {c} streams | FAIL | a round is missing (see serve.log) |"); continue
        broken = {who for a, b in pairs for who, r in (("tofy", a), ("llama-server", b))
                  if r["errors"] or not r["aggregate_tok_s"] or r["ttft_p50_ms"] is None}
        if broken:
            print(f"| serve ({name}), {c} streams | FAIL | failed requests: {', '.join(sorted(broken))} (see serve.log) |"); continue
        r = med([a["aggregate_tok_s"] / b["aggregate_tok_s"] for a, b in pairs])
        # The figures shown: each server's medians over the rounds.
        a = {k: med([p[0][k] for p in pairs]) for k in ("aggregate_tok_s", "ttft_p50_ms", "ttft_p99_ms")}
        b = {k: med([p[1][k] for p in pairs]) for k in ("aggregate_tok_s", "ttft_p50_ms", "ttft_p99_ms")}
        # The target is on the same tokens at 8 and 32 streams; chat rows carry tofy's extra
        # conditioning tokens, so they are reported, not judged.
        verdict = "INFO" if mode == "chat" or c not in (8, 32) else ("PASS" if r >= 1.0 else "MISS")
        print(f"| serve ({name}), {c} streams | {verdict} | tofy {a['aggregate_tok_s']:.0f} tok/s, TTFT p50/p99 "
              f"{a['ttft_p50_ms']:.0f}/{a['ttft_p99_ms']:.0f} ms; llama-server {b['aggregate_tok_s']:.0f} tok/s, "
              f"{b['ttft_p50_ms']:.0f}/{b['ttft_p99_ms']:.0f} ms; ratio {r:.2f} (median of 3 interleaved rounds) |")
EOF
fi

grep -q '| FAIL |' "$final/summary.md" && failed=1
# The table as JSON lines too, for BENCHMARKS.md and scripts.
python3 - "$final" <<'EOF'
import json, sys
final = sys.argv[1]
with open(f"{final}/summary.jsonl", "w") as f:
    for line in open(f"{final}/summary.md"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1] in ("PASS", "MISS", "FAIL", "INFO"):
            f.write(json.dumps({"check": cells[0], "result": cells[1], "figures": cells[2]}) + "\n")
EOF
rm -rf "$out/kernel-cache" "$out/seed-size.safetensors"
tar -C "$out" -czf "$final/logs.tar.gz" .
say "done: $(grep -c '| PASS |' "$final/summary.md") pass, $(grep -c '| MISS |' "$final/summary.md") miss (a target not met), $(grep -c '| FAIL |' "$final/summary.md") fail"
cat "$final/summary.md"
exit $failed
