#!/usr/bin/env bash
# One serving comparison in one run: our server (the embedded SmolLM2, f32 program) and llama.cpp's
# llama-server (scripts/build_llama_server.sh) on the same model at F16 and F32, each under the same
# load from `python -m bench.serving` (openai backend: /v1/completions streamed), then one table.
#   scripts/bench_serving.sh [OUT_DIR]     (env: CONCURRENCY=16 PROMPTS=32 INPUT_LEN=32 OUTPUT_LEN=128)
# W8A8=1 adds our server on the `--quantization w8a8` program and llama-server on a Q8_0 GGUF.
# MODEL=M.gguf serves that file instead: ours with its quantization kept (`--gguf-file`), llama-server on
# the file as it is (bench.random_gguf writes real shapes).
# Then single-stream runs on the idle servers: TTFT of a short prompt (other prompts than the first
# run's: --seed 1, so no prefix-cache hits).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-results}"; mkdir -p "$OUT"
PY="${PYTHON:-python}"
C="${CONCURRENCY:-16}"; N="${PROMPTS:-32}"; I="${INPUT_LEN:-32}"; O="${OUTPUT_LEN:-128}"
CACHE="${AOTLLM_CACHE:-$HOME/.cache/aotllm}"
GGUF="$("$PY" -c 'from models.default_model import smollm2_gguf; print(smollm2_gguf())')"
LLAMA_SERVER="$(PYTHON="$PY" scripts/build_llama_server.sh)"
# On a CPU with AMX int8, llama.cpp's AMX weight buffers segfault on the first Q8_0 prompt (llama.cpp issue
# 20824): no repacking there, as bench.offline does (bench/llama_cpp.py).
LLAMA_EXTRA=(); grep -q ' amx_int8' /proc/cpuinfo && LLAMA_EXTRA+=(--no-repack)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

wait_ready() {  # URL
  for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "server at $1 did not become ready" >&2; return 1
}
bench() {  # URL LABEL JSON [extra args]
  "$PY" -m bench.serving --url "$1" --backend openai --label "$2" --num-prompts "$N" --concurrency "$C" \
    --input-len "$I" --output-len "$O" --ignore-eos --disable-tqdm --json "$3" "${@:4}"
}

ours() {  # NAME LABEL [python -m serve model arguments]
  "$PY" -m serve --port 8000 --max-running "$C" "${@:3}" > "$OUT/$1-server.log" 2>&1 & pids+=($!)
  wait_ready http://127.0.0.1:8000/health
  curl -s http://127.0.0.1:8000/metrics | grep -E '^aotllm_(step|device)_seconds_total' > "$OUT/$1-metrics-before.txt" || true
  bench http://127.0.0.1:8000 "$2" "$OUT/$1.json"
  curl -s http://127.0.0.1:8000/metrics | grep -E '^aotllm_(step|device)_seconds_total' > "$OUT/$1-metrics-after.txt" || true
  "$PY" -m bench.serving --url http://127.0.0.1:8000 --backend openai --label "$2, 1 stream" \
    --num-prompts 8 --concurrency 1 --input-len 24 --output-len 32 --seed 1 --ignore-eos --disable-tqdm --json "$OUT/$1-single.json"
  kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
}

if [[ -n "${MODEL:-}" ]]; then
  ours aotllm "aotllm $(basename "$MODEL") kept" --gguf-file "$MODEL"
  LLAMA_TYPES=(as-is); RUNS=(aotllm)
else
  ours aotllm "aotllm f32"
  LLAMA_TYPES=(F16 F32); RUNS=(aotllm)
fi
if [[ "${W8A8:-0}" == 1 && -z "${MODEL:-}" ]]; then
  ours aotllm-w8a8 "aotllm w8a8" --quantization w8a8
  LLAMA_TYPES+=(Q8_0); RUNS+=(aotllm-w8a8)
fi

for dt in "${LLAMA_TYPES[@]}"; do
  model="${GGUF%.gguf}.llama-cpp-$dt.gguf"
  [[ "$dt" == as-is ]] && model="$MODEL"
  [[ -f "$model" ]] || "$PY" -c "from bench import llama_cpp; from pathlib import Path; import sys; \
lib = llama_cpp.ensure_installed(); llama_cpp.convert(lib, Path(sys.argv[1]), {'F16': 'float16', 'F32': 'float32', 'Q8_0': 'w8a8'}[sys.argv[2]])" "$GGUF" "$dt"
  ctx=$((C * (I + O + 64))); ((ctx < C * 512)) && ctx=$((C * 512))   # every slot holds a whole request
  "$LLAMA_SERVER" -m "$model" --port 8001 --parallel "$C" -c "$ctx" --threads "$(nproc)" \
    --no-webui "${LLAMA_EXTRA[@]}" > "$OUT/llama-server-$dt.log" 2>&1 & pids+=($!)
  wait_ready http://127.0.0.1:8001/health
  bench http://127.0.0.1:8001 "llama-server $dt --parallel $C" "$OUT/llama-server-$dt.json"
  "$PY" -m bench.serving --url http://127.0.0.1:8001 --backend openai --label "llama-server $dt, 1 stream" \
    --num-prompts 8 --concurrency 1 --input-len 24 --output-len 32 --seed 1 --ignore-eos --disable-tqdm --json "$OUT/llama-server-$dt-single.json"
  kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
done
"$PY" -m bench.serving --compare $(for r in "${RUNS[@]}"; do echo "$OUT/$r.json"; done) \
  $(for dt in "${LLAMA_TYPES[@]}"; do echo "$OUT/llama-server-$dt.json"; done) \
  $(for r in "${RUNS[@]}"; do echo "$OUT/$r-single.json"; done) \
  $(for dt in "${LLAMA_TYPES[@]}"; do echo "$OUT/llama-server-$dt-single.json"; done)
echo "our server's step time in the concurrent runs (seconds; device = inside the program's calls):"
for r in "${RUNS[@]}"; do for f in before after; do echo "$r $f:"; cat "$OUT/$r-metrics-$f.txt"; done; done
