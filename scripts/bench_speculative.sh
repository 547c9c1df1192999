#!/usr/bin/env bash
# Speculative decoding (issue 33): the same program served twice, `--speculative off` and `--speculative ngram
# --num-speculative-tokens K` (prompt lookup), one stream, greedy, on two workloads of bench.serving: grounded
# (copy a source file given in the prompt: the output is in the input) and chat (open questions: it is not),
# each 256 output tokens with EOS ignored (both servers generate alike many). Interleaved rounds whose order
# alternates (a shared host drifts); a round's seed is its number (other prompts each round, the same for
# both servers). Prints per run the output tok/s and the decode tok/s (1000 / mean TPOT), on / off of each,
# how many outputs are the same text (greedy: all of them should be), and the medians over the rounds.
#   scripts/bench_speculative.sh [OUT_DIR]
# env: PYTHON=python PORT=8127 (off; ngram on PORT+1) K=4 ROUNDS=5 PROMPTS=4 (per run) INPUT_LEN=512 (grounded)
#      OUTPUT_LEN=256 WORKLOADS="grounded chat" BACKEND=openai
#      GGUF=M.gguf (or MODEL=): served with --gguf-file, its quantizations kept; default: the default model
#      EXTRA_SERVE_ARGS="--quantization w8a8": more `python -m serve` flags, both servers
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-results/speculative}"; mkdir -p "$OUT"; rm -f "$OUT"/off_*_r*.json "$OUT"/ngram_*_r*.json
PY="${PYTHON:-python}"; PORT="${PORT:-8127}"; K="${K:-4}"; ROUNDS="${ROUNDS:-5}"; N="${PROMPTS:-4}"
I="${INPUT_LEN:-512}"; O="${OUTPUT_LEN:-256}"; BACKEND="${BACKEND:-openai}"
read -r -a WORKLOADS <<< "${WORKLOADS:-grounded chat}"
source scripts/serve_lib.sh
serve off "$PORT" --speculative off
serve ngram "$((PORT + 1))" --speculative ngram --num-speculative-tokens "$K"

one() {  # off|ngram WORKLOAD ROUND
  local port=$PORT; [ "$1" = ngram ] && port=$((PORT + 1))
  "$PY" -m bench.serving --url "http://127.0.0.1:$port" --backend "$BACKEND" --workload "$2" --num-prompts "$N" \
    --concurrency 1 --input-len "$I" --output-len "$O" --ignore-eos --temperature 0 --disable-tqdm \
    --seed "$3" --label "$1 $2 r$3" --json "$OUT/$1_$2_r$3.json" > /dev/null
}
for r in $(seq "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    if [ $((r % 2)) = 1 ]; then one off "$w" "$r"; one ngram "$w" "$r"; else one ngram "$w" "$r"; one off "$w" "$r"; fi
  done
done

"$PY" - "$OUT" "$ROUNDS" "$K" "${WORKLOADS[@]}" <<'PY'
import json, statistics, sys

out, rounds, k, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
TARGET = {"grounded": 1.5, "chat": 0.97}  # issue 33: on / off output tok/s
for w in workloads:
    print(f"\n{w}, one stream, greedy, --num-speculative-tokens {k}")
    print("| round | off tok/s | ngram tok/s | on / off | off decode tok/s | ngram decode tok/s | on / off (decode) | same text |")
    print("|------:|----------:|------------:|---------:|-----------------:|-------------------:|------------------:|----------:|")
    ratios, decode_ratios = [], []
    for r in range(1, rounds + 1):
        off, on = (json.load(open(f"{out}/{m}_{w}_r{r}.json")) for m in ("off", "ngram"))
        so, sn = off["summary"], on["summary"]
        ratios.append(sn["output_throughput"] / so["output_throughput"])
        do, dn = 1000 / so["mean_tpot_ms"], 1000 / sn["mean_tpot_ms"]
        decode_ratios.append(dn / do)
        texts = lambda d: {x["index"]: x["text"] for x in d["requests"] if x["success"]}
        a, b = texts(off), texts(on)
        same = sum(a[i] == b.get(i) for i in a)
        print(f"| {r} | {so['output_throughput']:.1f} | {sn['output_throughput']:.1f} | {ratios[-1]:.3f} | "
              f"{do:.1f} | {dn:.1f} | {decode_ratios[-1]:.3f} | {same}/{len(a)} |")
    med = statistics.median(ratios)
    verdict = f"; target >= {TARGET[w]}: {'met' if med >= TARGET[w] else 'NOT met'}" if w in TARGET else ""
    print(f"{w}: ngram / off output tok/s, median {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"decode tok/s, median {statistics.median(decode_ratios):.3f}{verdict}")
PY
