#!/usr/bin/env bash
# Drive an OpenAI-compatible server with OpenCode (`opencode run`), offline.
#
# Usage: tests/clients/opencode_check.sh BASE_URL
#   BASE_URL is the server root (e.g. http://127.0.0.1:8080); "/v1" is appended.
#   TOFY_API_KEY: API key OpenCode sends (none when unset).
#   OPENCODE_CHECK_KEEP=1 keeps the scratch dir (config, logs) for inspection.
#
# OpenCode runs with HOME and every XDG dir inside a fresh scratch dir, the
# models.dev catalogue fetch, autoupdate, sharing and external plugins off.
# The `@ai-sdk/openai-compatible` provider is compiled into the opencode
# binary, so nothing is installed at run time: no network is needed.
#
# The request OpenCode sends is ~7.7k SmolLM2 tokens (system prompt + tool
# schemas), so the server needs a context of about 8.7k per sequence
# (`tofy serve --ctx 8704`; docs/opencode.json says so to OpenCode).
# Exits 0 only if opencode exits 0 and prints a non-empty reply.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 BASE_URL" >&2
    exit 2
fi
base="${1%/}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
opencode="$here/node_modules/.bin/opencode"
if [[ ! -x "$opencode" ]]; then
    echo "FAIL: $opencode missing; run scripts/setup-clients.sh" >&2
    exit 1
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/opencode-check.XXXXXX")"
cleanup() {
    if [[ "${OPENCODE_CHECK_KEEP:-0}" == 1 ]]; then
        echo "scratch dir kept: $scratch" >&2
    else
        rm -rf "$scratch"
    fi
}
trap cleanup EXIT

project="$scratch/project"
mkdir -p "$project" "$scratch/home" "$scratch/config" "$scratch/data" \
    "$scratch/cache" "$scratch/state"

# The config is docs/opencode.json (the user-facing example) with baseURL
# pointed at BASE_URL and limit.output (max_tokens per request) cut to 64 to
# keep the run short. limit.context tells OpenCode when to compact.
node - "$here/../../docs/opencode.json" "$base/v1" >"$project/opencode.json" <<'JS'
const fs = require('fs');
const [, , path, baseURL] = process.argv;
const cfg = JSON.parse(fs.readFileSync(path, 'utf8'));
cfg.provider.tofy.options.baseURL = baseURL;
cfg.provider.tofy.models.tofy.limit.output = 64;
process.stdout.write(JSON.stringify(cfg, null, 2) + '\n');
JS

# On start OpenCode installs @opencode-ai/plugin (the SDK for custom tools)
# into each config dir from the npm registry, in the background. Its check
# skips the install when node_modules exists and package-lock.json already
# lists every wanted dependency; no plugin or custom tool is used here, so an
# empty node_modules with such a lock keeps it offline. Without this the run
# still passes offline: the failed install is only logged as a warning.
ocver="$(node -p "require('$here/node_modules/opencode-ai/package.json').version")"
mkdir -p "$scratch/config/opencode/node_modules"
printf '{\n  "dependencies": {\n    "@opencode-ai/plugin": "%s"\n  }\n}\n' "$ocver" \
    >"$scratch/config/opencode/package.json"
printf '{\n  "lockfileVersion": 3,\n  "packages": {\n    "": {\n      "dependencies": {\n        "@opencode-ai/plugin": "%s"\n      }\n    }\n  }\n}\n' "$ocver" \
    >"$scratch/config/opencode/package-lock.json"

out="$scratch/stdout"
err="$scratch/stderr"
rc=0
(
    cd "$project"
    env HOME="$scratch/home" \
        XDG_CONFIG_HOME="$scratch/config" \
        XDG_DATA_HOME="$scratch/data" \
        XDG_CACHE_HOME="$scratch/cache" \
        XDG_STATE_HOME="$scratch/state" \
        OPENCODE_DISABLE_MODELS_FETCH=1 \
        OPENCODE_DISABLE_AUTOUPDATE=1 \
        OPENCODE_DISABLE_SHARE=1 \
        OPENCODE_DISABLE_DEFAULT_PLUGINS=1 \
        OPENCODE_DISABLE_LSP_DOWNLOAD=1 \
        OPENCODE_DISABLE_CLAUDE_CODE=1 \
        OPENCODE_DISABLE_EXTERNAL_SKILLS=1 \
        timeout 300 "$opencode" run --pure --print-logs --log-level INFO \
        -m tofy/tofy --title "tofy check" "Say hello in one short sentence." \
        </dev/null >"$out" 2>"$err"
) || rc=$?

reply="$(tr -d '[:space:]' <"$out")"
if [[ $rc -ne 0 || -z "$reply" ]]; then
    echo "FAIL: opencode exited $rc; stdout ${#reply} non-blank chars" >&2
    echo "--- stdout" >&2
    tail -c 2000 "$out" >&2 || true
    echo "--- stderr (last 40 lines)" >&2
    tail -n 40 "$err" >&2 || true
    exit 1
fi
echo "opencode reply: $(head -c 300 "$out" | tr '\n' ' ')"
echo "ok"
