#!/usr/bin/env bash
# Installs the third-party clients that check `tofy serve`:
#   - tests/clients/node_modules (npm ci): ai, @ai-sdk/openai-compatible, opencode-ai
#   - target/clients-venv (python venv): tests/clients/requirements.txt (openai)
# Idempotent and fast when already done: npm ci is skipped while node_modules
# is newer than package.json and package-lock.json, pip while the venv
# already has every pinned version. Needs node >= 20, npm and python3 >= 3.9.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
clients="$root/tests/clients"
venv="$root/target/clients-venv"
req="$clients/requirements.txt"

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "setup-clients: '$1' not found: $2" >&2
        exit 1
    }
}
need_cmd node "install Node.js 20 or later"
need_cmd npm "install npm (comes with Node.js)"
need_cmd python3 "install Python 3 with the venv module"

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if ((node_major < 20)); then
    echo "setup-clients: node $(node --version) is too old; need >= 20" >&2
    exit 1
fi

# npm: node_modules/.package-lock.json is written by every npm ci/install.
stamp="$clients/node_modules/.package-lock.json"
if [[ -f "$stamp" && "$stamp" -nt "$clients/package-lock.json" \
    && "$stamp" -nt "$clients/package.json" \
    && -x "$clients/node_modules/.bin/opencode" ]]; then
    echo "setup-clients: npm: tests/clients/node_modules up to date"
else
    echo "setup-clients: npm: npm ci --prefix tests/clients"
    npm ci --prefix "$clients" --no-audit --no-fund --loglevel=error >/dev/null
fi

# venv: recreate when missing or when its interpreter no longer runs.
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c '' 2>/dev/null; then
    echo "setup-clients: venv: target/clients-venv exists"
else
    echo "setup-clients: venv: creating target/clients-venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
fi

# pip: skip when every `name==version` line of requirements.txt is installed.
if "$venv/bin/python" - "$req" <<'PY'
import re, sys
from importlib import metadata
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    try:
        have = metadata.version(norm(name.strip()))
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if have != want.strip():
        sys.exit(1)
PY
then
    echo "setup-clients: pip: target/clients-venv has tests/clients/requirements.txt"
else
    echo "setup-clients: pip: installing tests/clients/requirements.txt"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
fi
