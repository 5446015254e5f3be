#!/usr/bin/env bash
# The CUDA 13.0 toolkit that `make cuda` compiles with, from pinned PyPI wheels, in
# target/cuda-toolkit: no GPU, no driver and no NVIDIA apt repository needed.
#
#   scripts/cuda-toolkit.sh          install it (idempotent; ~520 MB download, ~1.1 GB on disk)
#   source scripts/cuda-toolkit.sh env
#                                    set PATH, CUDAToolkit_ROOT, ... for a cargo or cmake build
#
# Every package is pinned: nvidia-cuda-nvcc depends on nvvm, runtime and crt unpinned, and pip
# would otherwise mix in a newer CUDA (../shared/notes/cuda-build.md §2). Three fix-ups make the
# wheels look like a toolkit to nvcc and CMake; each prevents a failure seen without it.
# (Sourced, it keeps the caller's shell options.)
[[ "${BASH_SOURCE[0]}" == "$0" ]] && set -euo pipefail

TOOLKIT_DIR=${TOOLKIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/cuda-toolkit}
PACKAGES=(
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
    nvidia-cuda-culibos==13.0.85 nvidia-cuda-nvrtc==13.0.88 ninja==1.13.0
)
STAMP=$TOOLKIT_DIR/.tofy-toolkit-13.0.88

cuda_root() {
    local site
    site=$("$TOOLKIT_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$site/nvidia/cu13"
}

install_toolkit() {
    [ -f "$STAMP" ] && return 0
    echo "cuda-toolkit: installing CUDA 13.0 from PyPI into $TOOLKIT_DIR (~520 MB download)"
    python3 -m venv "$TOOLKIT_DIR"
    "$TOOLKIT_DIR/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}"
    local cu
    cu=$(cuda_root)
    # nvcc.profile links from lib64 and lib64/stubs.
    ln -sfn lib "$cu/lib64"
    # FindCUDAToolkit wants the unversioned names (else "missing: CUDA_CUDART").
    for lib in cudart cublas cublasLt nvrtc; do
        ln -sf "lib$lib.so.13" "$cu/lib/lib$lib.so"
    done
    # A link-time stub of libcuda (no wheel ships one): ggml-cuda links CUDA::cuda_driver.
    # Every entry point returns CUDA_ERROR_STUB_LIBRARY (34). It is never on a run-time path.
    mkdir -p "$cu/lib/stubs"
    gcc -E -P -I"$cu/include" "$cu/include/cuda.h" |
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*(//' | sort -u |
        sed 's/.*/int &(void){return 34;}/' >"$TOOLKIT_DIR/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$TOOLKIT_DIR/cuda_stub.c"
    "$cu/bin/nvcc" --version | grep -q 'release 13.0' || {
        echo "cuda-toolkit: nvcc is not release 13.0" >&2
        exit 1
    }
    touch "$STAMP"
}

export_env() {
    local cu
    cu=$(cuda_root)
    export CUDA_ROOT_DIR=$cu
    export PATH=$cu/bin:$TOOLKIT_DIR/bin:$PATH
    export CUDAToolkit_ROOT=$cu CUDACXX=$cu/bin/nvcc CUDA_LIBRARY_PATH=$cu
    export CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90-real}
    export CMAKE_GENERATOR=Ninja
}

install_toolkit
if [ "${1:-}" = env ]; then
    export_env
fi
