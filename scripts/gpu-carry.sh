#!/usr/bin/env bash
# Stages `make cuda`'s archive and the default GGUF for the lent GPU machine (docs/gpu.md), and
# prints the device calls that run the GPU check. A call carries at most 64 MiB, the
# repository's tracked files included, and the 98 MB GGUF does not fit in one: it travels in
# pieces, and the machine keeps /tmp between calls while it is warm (30 s).
#
# usage: scripts/gpu-carry.sh      (after make cuda and make models)
set -euo pipefail
cd "$(dirname "$0")/.."
archive=target/cuda/tofy-cuda.tar.xz
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
stage=target/gpu-carry
[ -f "$archive" ] || { echo "no $archive: run make cuda first" >&2; exit 1; }
[ -f "$gguf" ] || { echo "no $gguf: run make models first" >&2; exit 1; }
rm -rf "$stage"
mkdir -p "$stage"
cp "$archive" "$stage/"
sum=$(sha256sum "$gguf" | cut -d' ' -f1)
limit=$((64 * 1048576))
# What travels with every call: tracked files, and untracked ones git does not ignore.
tracked=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
piece=$((limit - tracked - 2 * 1048576))
split -b "$piece" -d "$gguf" "$stage/gguf."
mib() { echo "$(($1 / 1048576)) MiB"; }
for f in "$stage"/*; do
    size=$(stat -c %s "$f")
    echo "$f: $(mib "$size"), with the repository's files $(mib $((size + tracked))) of 64"
    if [ $((size + tracked)) -gt $limit ]; then
        echo "gpu-carry: $f does not fit in one device call: make the archive smaller (fewer CUDA_ARCHS) or the repository lighter" >&2
        exit 1
    fi
done
name=$(basename "$gguf")
pieces=("$stage"/gguf.*)
echo
echo "Device calls, back to back (each within 30 s of the last), timeout_s as given:"
echo " 1. carry [\"$stage/tofy-cuda.tar.xz\"], timeout_s 120:"
echo "    mkdir -p /tmp/g && tar xJf $stage/tofy-cuda.tar.xz -C /tmp/g && /tmp/g/tofy-cuda/bin/tofy doctor"
n=1
for p in "${pieces[@]}"; do
    n=$((n + 1))
    if [ "$p" != "${pieces[-1]}" ]; then
        echo " $n. carry [\"$p\"], timeout_s 60:"
        echo "    cp $p /tmp/g/"
    else
        echo " $n. carry [\"$p\"], timeout_s 540:"
        echo "    cp $p /tmp/g/ && cat /tmp/g/gguf.* >/tmp/g/tofy-cuda/models/$name && echo \"$sum  /tmp/g/tofy-cuda/models/$name\" | sha256sum -c && /tmp/g/tofy-cuda/scripts/gpu-check.sh"
    fi
done
