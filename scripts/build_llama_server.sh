#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` (the peer of `python -m bench.serving`) from the llama.cpp that
# llama-cpp-python 0.3.36 vendors (the same llama.cpp bench.offline --compare-llama-cpp runs), CPU only,
# -march=native. The binary lands in ~/.cache/aotllm/llama-server/bin.
#   scripts/build_llama_server.sh && ~/.cache/aotllm/llama-server/bin/llama-server -m M.gguf --parallel 16 ...
set -euo pipefail
VERSION=0.3.36
ROOT="${AOTLLM_CACHE:-$HOME/.cache/aotllm}/llama-server"
BIN="$ROOT/bin/llama-server"
if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$ROOT/src"
PY="${PYTHON:-python3}"
if ! ls "$ROOT"/src/llama_cpp_python-$VERSION.tar.gz >/dev/null 2>&1; then
  "$PY" -m pip download --no-deps --no-binary :all: --dest "$ROOT/src" "llama-cpp-python==$VERSION" >&2
fi
tar xzf "$ROOT/src/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/src"
SRC="$ROOT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$ROOT/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$ROOT/bin" && cp "$ROOT/build/bin/llama-server" "$BIN"
echo "$BIN"
