#!/usr/bin/env bash
# The GPU check's peers, llama-bench and llama-server, built from the llama.cpp sources of the
# llama-cpp-sys-2 crate that tofy links, so that on the GPU machine they run on the very
# libllama, libggml and backend modules (libggml-cuda.so included) that tofy loads.
#
# The crate ships llama.cpp's libraries, common/ and tools/mtmd, but not the tools themselves:
# their sources come from the llama-cpp-python sdist on PyPI (as ../shared/peers does), laid
# over a copy of the crate's tree. Two places in them differ from the crate's libraries, and
# are patched: fs_open_ifstream (a wrapper of std::ifstream's constructor, absent from the
# crate's common/) becomes the plain constructor, and mtmd's memory estimate (a map in the
# sdist, a struct holding that map in the crate) is read through the struct; that code runs
# only for multimodal projectors, which the check does not load. Besides libllama and libggml,
# which the caller takes from the crate's build, the tools need their own libraries
# (libllama-common, libmtmd and the two tool libraries), copied to OUT_DIR/lib.
#
# usage: scripts/build-cuda-peers.sh CRATE_LLAMA_CPP_DIR OUT_DIR LLAMA_CPP_PYTHON_VERSION
# Needs cmake and ninja (scripts/cuda-toolkit.sh env puts ninja on PATH). ~12 min on 2 cores.
set -euo pipefail
crate=$1
out=$(mkdir -p "$2" && cd "$2" && pwd)
lcpv=$3
src=$out/src
sdist=$out/dl/llama_cpp_python-$lcpv
if [ ! -f "$out/dl/llama_cpp_python-$lcpv.tar.gz" ]; then
    mkdir -p "$out/dl"
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$lcpv" -d "$out/dl"
fi
# The tools, and the script that provisions the server's (here: empty) web UI assets.
tar xzf "$out/dl/llama_cpp_python-$lcpv.tar.gz" -C "$out/dl" \
    "llama_cpp_python-$lcpv/vendor/llama.cpp/tools" \
    "llama_cpp_python-$lcpv/vendor/llama.cpp/scripts/ui-assets.cmake"
rm -rf "$src"
cp -a "$crate" "$src"
chmod -R u+w "$src"
for tool in llama-bench server ui; do
    rm -rf "${src:?}/tools/$tool"
    cp -a "$sdist/vendor/llama.cpp/tools/$tool" "$src/tools/$tool"
done
mkdir -p "$src/scripts" && cp "$sdist/vendor/llama.cpp/scripts/ui-assets.cmake" "$src/scripts/"
sed -i 's/\bfs_open_ifstream(/std::ifstream(/g' "$src/tools/server/server-mcp.cpp"
sed -i 's/mtmd_get_memory_usage(mmproj_path.c_str(), mparams);/mtmd_get_memory_usage(mmproj_path.c_str(), mparams).backend_mem_usage;/' \
    "$src/tools/server/server-context.cpp"
cat >"$src/tools/CMakeLists.txt" <<'EOF'
# Only the GPU check's peers (scripts/build-cuda-peers.sh).
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(mtmd)
add_subdirectory(llama-bench)
add_subdirectory(ui)
add_subdirectory(server)
EOF
# The crate's options where they shape the libraries (shared, backends as modules, no native
# flags); no backend of its own: the crate's modules serve at run time.
cmake -S "$src" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_CPU=OFF \
    -DGGML_CUDA=OFF -DGGML_RPC=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_RPATH='$ORIGIN' >"$out/cmake.log"
cmake --build "$out/build" --target llama-bench llama-server >"$out/build.log"
mkdir -p "$out/bin" "$out/lib"
cp "$out/build/bin/llama-bench" "$out/build/bin/llama-server" "$out/bin/"
# The tools' own libraries (the tools are thin executables over them).
for lib in libmtmd.so.0 libllama-common.so.0 libllama-server-impl.so libllama-bench-impl.so; do
    cp -L "$out/build/bin/$lib" "$out/lib/"
done
echo "peers: $out/bin/llama-bench, $out/bin/llama-server (llama-cpp-python $lcpv tools on $crate)"
