# Sourced by the bench scripts that compare servers: `serve NAME PORT [flags]` starts `python -m serve` on the
# model they share and waits until /health says ready; every server started is stopped when the script exits.
# Needs: PY (the python), OUT (the results folder: NAME-server.log goes there); SERVE_ARGS (an array, optional):
# the script's own flags for every server.
# env: GGUF=M.gguf (or MODEL=): served with --gguf-file, its quantizations kept; default: the default model
#      EXTRA_SERVE_ARGS: more `python -m serve` flags, every server (after the script's, before `serve`'s own)
GGUF="${GGUF:-${MODEL:-}}"
MODEL_ARGS=(); [ -n "$GGUF" ] && MODEL_ARGS=(--gguf-file "$GGUF")
read -r -a EXTRA <<< "${EXTRA_SERVE_ARGS:-}"
[ -n "${SERVE_ARGS+x}" ] || SERVE_ARGS=()
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

serve() {  # NAME PORT [flags]
  "$PY" -m serve "${MODEL_ARGS[@]}" --port "$2" "${SERVE_ARGS[@]}" --log-level warning "${EXTRA[@]}" "${@:3}" \
    > "$OUT/$1-server.log" 2>&1 & pids+=($!)
  local pid=$!
  for _ in $(seq 1800); do
    curl -sf "localhost:$2/health" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "the $1 server exited:" >&2; tail -20 "$OUT/$1-server.log" >&2; return 1; }
    sleep 1
  done
  echo "the $1 server did not become ready (see $OUT/$1-server.log)" >&2; return 1
}
