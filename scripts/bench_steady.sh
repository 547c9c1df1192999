#!/usr/bin/env bash
# Steady streams (issue 33): the same program served twice, with the old scheduler (--no-mixed-step: each
# step's decode and prefill as separate program calls) and the default (one mixed program call per step), each
# under the same load: 16 streams, Poisson arrivals, prompts of 32 and 1024 tokens mixed (bench.serving
# --input-len 32,1024, seeded: both servers get the same sequence), 128 output tokens, EOS ignored. Interleaved
# rounds whose order alternates (a shared host drifts); a round's seed is its number, so no prompt comes back
# through the prefix cache. Prints per run the median and p99 gap between streamed tokens (ITL), p99 / median
# and output tok/s, then mixed / separate output tok/s, and the medians over the rounds.
#   scripts/bench_steady.sh [OUT_DIR]
# env: PYTHON=python PORT=8125 (separate; mixed on PORT+1) ROUNDS=3 RATE=2 (requests/s) PROMPTS=64
#      CONCURRENCY=16 INPUT_LEN=32,1024 OUTPUT_LEN=128 BACKEND=openai
#      GGUF=M.gguf (or MODEL=): served with --gguf-file, its quantizations kept; default: the default model
#      EXTRA_SERVE_ARGS="--quantization w8a8 --kv-pages 2048": more `python -m serve` flags, both servers
# Both servers stay up through the rounds (the one not measured is idle); the second starts once the first
# is ready, so that a program to build is built once.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-results/steady}"; mkdir -p "$OUT"; rm -f "$OUT"/separate_r*.json "$OUT"/mixed_r*.json
PY="${PYTHON:-python}"; PORT="${PORT:-8125}"; ROUNDS="${ROUNDS:-3}"; RATE="${RATE:-2}"; N="${PROMPTS:-64}"
C="${CONCURRENCY:-16}"; I="${INPUT_LEN:-32,1024}"; O="${OUTPUT_LEN:-128}"; BACKEND="${BACKEND:-openai}"
SERVE_ARGS=(--max-running "$C")
source scripts/serve_lib.sh
serve separate "$PORT" --no-mixed-step
serve mixed "$((PORT + 1))"

one() {  # separate|mixed ROUND
  local port=$PORT; [ "$1" = mixed ] && port=$((PORT + 1))
  "$PY" -m bench.serving --url "http://127.0.0.1:$port" --backend "$BACKEND" --num-prompts "$N" \
    --concurrency "$C" --request-rate "$RATE" --input-len "$I" --output-len "$O" --ignore-eos --disable-tqdm \
    --seed "$2" --label "$1 r$2" --json "$OUT/$1_r$2.json" > /dev/null
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then one separate "$r"; one mixed "$r"; else one mixed "$r"; one separate "$r"; fi
done

"$PY" - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys

out, rounds = sys.argv[1], int(sys.argv[2])
runs = {(m, r): json.load(open(f"{out}/{m}_r{r}.json"))["summary"] for m in ("separate", "mixed") for r in range(1, rounds + 1)}
s0 = runs["separate", 1]
print(f"{s0.get('workload') or 'synthetic'} prompts of {s0.get('input_lens') or '?'} tokens")
print("| round | scheduler | ITL median (ms) | ITL p99 (ms) | p99 / median | TTFT median (ms) | output tok/s | failed |")
print("|------:|-----------|----------------:|-------------:|-------------:|-----------------:|-------------:|-------:|")
spread, ratios = {"separate": [], "mixed": []}, []
for r in range(1, rounds + 1):
    for m in ("separate", "mixed"):
        s = runs[m, r]
        spread[m].append(s["p99_itl_ms"] / s["median_itl_ms"])
        print(f"| {r} | {m} | {s['median_itl_ms']:.2f} | {s['p99_itl_ms']:.2f} | {spread[m][-1]:.2f} | "
              f"{s['median_ttft_ms']:.1f} | {s['output_throughput']:.1f} | {s['failed']} |")
    ratios.append(runs["mixed", r]["output_throughput"] / runs["separate", r]["output_throughput"])
print()
for m in ("separate", "mixed"):
    med = lambda k: statistics.median(runs[m, r][k] for r in range(1, rounds + 1))
    print(f"{m:>8}: median over rounds: ITL median {med('median_itl_ms'):.2f} ms, p99 {med('p99_itl_ms'):.2f} ms, "
          f"p99 / median {statistics.median(spread[m]):.2f}, output {med('output_throughput'):.1f} tok/s")
print("mixed / separate output tok/s by round: " + ", ".join(f"{x:.3f}" for x in ratios)
      + f"; median {statistics.median(ratios):.3f}")
print(f"target (issue 33): mixed p99 / median <= 2 ({'met' if statistics.median(spread['mixed']) <= 2 else 'NOT met'}), "
      f"mixed / separate tok/s >= 1 ({'met' if statistics.median(ratios) >= 1 else 'NOT met'})")
PY
