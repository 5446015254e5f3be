#!/usr/bin/env bash
# make cuda: the GPU build, made on this machine with no GPU (docs/gpu.md).
#
#   1. the CUDA 13.0 toolkit from pinned PyPI wheels, in target/cuda-toolkit (scripts/cuda-toolkit.sh);
#   2. tofy --features cuda, in its own target dir (target/cuda: CI's CPU build is untouched):
#      llama.cpp's CUDA backend as a run-time module (libggml-cuda.so) for CUDA_ARCHS, the
#      world model's kernels compiled by NVRTC when a GPU is found;
#   3. the cuda feature's tests (tests/cuda.rs) with the toolkit's libraries on the library path:
#      the fallback without a driver, and the kernels compiled by NVRTC;
#   4. the peers the GPU check compares against, llama-bench and llama-server, compiled from the
#      crate's own llama.cpp sources and run on the very same libraries and backend modules;
#   5. one archive, target/cuda/tofy-cuda.tar.xz (< 60 MiB): bin/ (tofy, the peers, libllama,
#      libggml*, the backend modules), scripts/gpu-check.sh and what it reads.
#
# env: CUDA_ARCHS  CUDA architectures for llama.cpp's kernels, CMake's syntax (default 90-real:
#                  H100/H200). E.g. "80-real;86-real" (A100, RTX 30), "89-real" (L4, RTX 40),
#                  "100-real" (B200), "120-real" (RTX 50). A "-real" target carries machine code
#                  only; a plain "90" adds PTX that newer GPUs can JIT. The world model needs no
#                  choice: its kernels are compiled for the GPU at hand when tofy starts.
#      JOBS        parallel compile jobs (default: all cores)
#
# The first run is long on a small machine: ggml's 144 CUDA translation units and its 14 CPU
# variants take 60-75 min on 2 cores (progress is printed every minute). Later runs reuse
# target/cuda and take minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
archs=${CUDA_ARCHS:-90-real}
jobs=${JOBS:-$(nproc)}
target=$root/target/cuda
dist=$target/dist/tofy-cuda
archive=$target/tofy-cuda.tar.xz
sysv=0.1.161
lcpv=0.3.36 # llama-cpp-python, whose sdist holds the llama-bench and llama-server sources
step() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }

step "1/5 CUDA 13.0 toolkit (PyPI)"
export CUDA_ARCHS=$archs
# shellcheck source=scripts/cuda-toolkit.sh
source scripts/cuda-toolkit.sh env
export CMAKE_BUILD_PARALLEL_LEVEL=$jobs
nvcc --version | tail -1

step "2/5 tofy --features cuda for $archs (first build: about an hour on 2 cores)"
cargo fetch --locked
progress() {
    while sleep 60; do
        local log
        log=$(ls -t "$target"/release/build/llama-cpp-sys-2-*/out/build/.ninja_log 2>/dev/null | head -1)
        [ -n "$log" ] || continue
        local done total
        done=$(($(wc -l <"$log") - 1))
        total=$(grep -c '^build .*\.o: ' "$(dirname "$log")/build.ninja" 2>/dev/null || echo '?')
        echo "   llama.cpp: $done of ~$total compile steps done ($(date +%H:%M))"
    done
}
progress &
ticker=$!
trap 'kill $ticker 2>/dev/null || true' EXIT
cargo build --release --locked --features cuda --target-dir "$target" --bin tofy
kill $ticker 2>/dev/null || true
out_dir=$(dirname "$(ls -t "$target"/release/build/llama-cpp-sys-2-*/out/lib/libllama.so* | head -1)")/..
out_dir=$(cd "$out_dir" && pwd)

step "3/5 tests/cuda.rs and clippy with --features cuda"
# The toolkit's cuBLAS, NVRTC and cudart, never its libcuda stub: no driver here.
export LD_LIBRARY_PATH=$CUDA_ROOT_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cargo clippy --release --locked --features cuda --target-dir "$target" --all-targets -- -D warnings
# The no-driver tests are ignored by default (beside a driver they cannot
# pass, and a skip must read as one): without a driver they run as well.
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
    echo "an NVIDIA driver is present: tests/cuda.rs's no-driver tests stay ignored"
    cargo test --release --locked --features cuda --target-dir "$target" --test cuda
else
    cargo test --release --locked --features cuda --target-dir "$target" --test cuda -- --include-ignored
fi

step "4/5 peers: llama-bench and llama-server on the crate's llama.cpp"
crate=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$sysv"/llama.cpp | head -1)
peers=$target/peers
scripts/build-cuda-peers.sh "$crate" "$peers" "$lcpv"

step "5/5 the archive"
rm -rf "$dist"
mkdir -p "$dist/bin" "$dist/scripts" "$dist/models/world" "$dist/tests/fixtures"
cp "$target/release/tofy" "$dist/bin/"
# The libraries with their links resolved (their SONAMEs end in .so.0), the backend modules
# (CPU variants, CUDA, RPC), and the peers linked against the same libllama/libggml.
for lib in "$out_dir"/lib/lib*.so.0 "$out_dir"/backends/*.so; do
    cp -L "$lib" "$dist/bin/"
done
cp -L "$peers"/bin/llama-bench "$peers"/bin/llama-server "$peers"/lib/* "$dist/bin/"
# OpenMP's runtime, which ggml links, in case the GPU machine's image lacks it.
cp -L "$(gcc -print-file-name=libgomp.so.1)" "$dist/bin/"
mkdir -p "$dist/peers"
ln -s ../bin/llama-bench "$dist/peers/llama-bench"
ln -s ../bin/llama-server "$dist/peers/llama-server"
strip --strip-unneeded "$dist"/bin/*.so* "$dist"/bin/llama-* 2>/dev/null || true
strip --strip-debug "$dist/bin/tofy" # keeps the symbols that name a panic's frames
cp scripts/gpu-check.sh scripts/world_ref.py scripts/bench-server.py "$dist/scripts/"
cp models/world/model_world_1.51M.safetensors models/world/vocab_world.txt "$dist/models/world/"
cp -r tests/fixtures/seed-tiny "$dist/tests/fixtures/"
{
    echo "tofy $(git describe --always --dirty) built $(date -u +%Y-%m-%dT%H:%MZ) for CUDA_ARCHS=$archs"
    echo "llama-cpp-sys-2 $sysv; CUDA toolkit 13.0 (PyPI); peers: llama-cpp-python $lcpv tools on the crate's llama.cpp"
} >"$dist/BUILD-INFO"
tar -C "$(dirname "$dist")" -cJf "$archive" tofy-cuda
size=$(stat -c %s "$archive")
echo "archive: $archive, $((size / 1048576)) MiB ($(du -sh "$dist" | cut -f1) unpacked)"
# A device call carries 64 MiB, the repository's own files included (scripts/gpu-carry.sh).
repo=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
if [ "$size" -gt $((60 * 1048576)) ] || [ $((size + repo)) -gt $((62 * 1048576)) ]; then
    echo "the archive is too big to carry ($((size / 1048576)) MiB + $((repo / 1048576)) MiB of repository, 62 at most): build for fewer CUDA_ARCHS" >&2
    exit 1
fi
cat <<EOF

The GGUF does not fit beside it (98 MB): docs/gpu.md says how to carry both. On the GPU machine:
    tar xJf tofy-cuda.tar.xz && cp SmolLM2-135M-Instruct.Q4_1.gguf tofy-cuda/models/ \\
        && tofy-cuda/scripts/gpu-check.sh
EOF
