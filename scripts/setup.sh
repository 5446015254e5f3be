#!/usr/bin/env bash
# Installs what building and testing Tofy needs on a fresh machine of the
# project's kind (Debian, root, Rust toolchain present). Idempotent: does
# nothing when everything is already there.
set -euo pipefail

# Debian packages the build needs: llama-cpp-sys-2 builds llama.cpp with
# cmake and generates its bindings with bindgen (clang + libclang).
APT_PACKAGES=(cmake clang libclang-dev)
# `scripts/setup.sh --cluster` adds nginx for make cluster-check.
if [[ "${1:-}" == "--cluster" ]]; then
    APT_PACKAGES+=(nginx-light)
elif (($#)); then
    echo "setup: unknown option '$1'; the only option is --cluster (adds nginx-light)" >&2
    exit 2
fi

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "setup: '$1' not found: $2" >&2
        exit 1
    }
}

need_cmd cargo "install the Rust toolchain (https://rustup.rs) and re-run"
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        need_cmd rustup "install $component for your Rust toolchain"
        rustup component add "$component"
    fi
done

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
