#!/usr/bin/env bash
# Structured output's cost: one server (SmolLM2's Q4_1 GGUF kept, or MODEL=M.gguf; no prefix cache, so
# that every request prefills), plain requests against requests each constrained to one of N generated JSON
# schemas (bench.serving --json-schemas), in interleaved rounds whose order alternates (a shared host
# drifts); 16 streams, then a single stream. Prints each round's output tok/s ratio and their median.
#   scripts/bench_structured.sh [OUT_DIR]     (env: ROUNDS16=5 ROUNDS1=10 PYTHON=python PORT=8124)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-results/structured}"; mkdir -p "$OUT"; rm -f "$OUT"/*_c*_r*.json
PY="${PYTHON:-python}"; PORT="${PORT:-8124}"
MODEL="${MODEL:-$("$PY" -c 'from models.default_model import smollm2_gguf; print(smollm2_gguf())')}"
"$PY" -m serve --gguf-file "$MODEL" --port "$PORT" --no-prefix-caching --log-level warning > "$OUT/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1800); do curl -sf "localhost:$PORT/health" >/dev/null 2>&1 && break; sleep 1; done
one() {  # plain|schema CONCURRENCY PROMPTS ROUND
  extra=(); [ "$1" = schema ] && extra=(--json-schemas "$3")
  "$PY" -m bench.serving --url "http://127.0.0.1:$PORT" --backend openai --input-len 512 --output-len 128 \
    --ignore-eos --disable-tqdm --num-prompts "$3" --concurrency "$2" --seed "$4" "${extra[@]}" \
    --label "$1 c$2 r$4" --json "$OUT/$1_c$2_r$4.json" > /dev/null
}
for c in 16 1; do
  rounds=$([ "$c" = 16 ] && echo "${ROUNDS16:-5}" || echo "${ROUNDS1:-10}"); n=$([ "$c" = 16 ] && echo 32 || echo 4)
  for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then one plain "$c" "$n" "$r"; one schema "$c" "$n" "$r"
    else one schema "$c" "$n" "$r"; one plain "$c" "$n" "$r"; fi
  done
done
"$PY" - "$OUT" <<'PY'
import glob, json, statistics, sys

out = sys.argv[1]
for c in (16, 1):
    ratios = []
    for r in sorted(int(p.rsplit("_r", 1)[1][:-5]) for p in glob.glob(f"{out}/plain_c{c}_r*.json")):
        p, s = (json.load(open(f"{out}/{m}_c{c}_r{r}.json"))["summary"] for m in ("plain", "schema"))
        ratios.append(s["output_throughput"] / p["output_throughput"])
        print(f"{c:>2} streams, round {r}: plain {p['output_throughput']:.1f} tok/s (TPOT {p['mean_tpot_ms']:.2f} ms), "
              f"schema {s['output_throughput']:.1f} tok/s (TPOT {s['mean_tpot_ms']:.2f} ms): {ratios[-1]:.3f}")
    print(f"{c:>2} streams: schema / plain output tok/s, median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
PY
