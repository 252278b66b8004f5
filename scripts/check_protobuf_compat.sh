#!/usr/bin/env bash
# The SDK on protobuf 5 and 6: installs ./client into throwaway virtualenvs (python -m venv, pip
# from the configured package index) beside protobuf 5.26.1 (the lowest client/pyproject.toml
# allows), the newest 5.x and the newest 6.x, and calls a real gateway from each (Embed, Rerank,
# Generate when served, ListModels; request ids). A script, not a test: building three venvs
# and starting Triton took 80 s here, too slow for the test suite.
#
#   bash scripts/check_protobuf_compat.sh                   # starts Triton + a gateway (minilm)
#   bash scripts/check_protobuf_compat.sh 127.0.0.1:50051   # or calls a gateway already running
#
# Needs `make setup models` (the repository's .venv runs Triton and the gateway).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/ragserve-protobuf-compat.XXXXXX)"
SPECS=("protobuf==5.26.1" "protobuf>=5.26,<6" "protobuf>=6,<7")
GATEWAY_PID=""
cleanup() {
  if [[ -n "$GATEWAY_PID" ]]; then kill "$GATEWAY_PID" 2>/dev/null || true; wait "$GATEWAY_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

TARGET="${1:-}"
if [[ -z "$TARGET" ]]; then
  # Triton and the gateway from the repository's venv (tests/support.py starts and stops them).
  "$ROOT/.venv/bin/python" - "$WORK" > "$WORK/serve.log" 2>&1 <<'EOF' &
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below: stop the gateway and Triton
sys.path.insert(0, str(Path.cwd() / "tests"))
from support import GatewayProcess, start_triton
work = Path(sys.argv[1])
triton = start_triton(work, ["minilm"])
gateway = GatewayProcess(triton.grpc_url, ["minilm"], work / "gateway.log").wait_serving(120)
(work / "address").write_text(gateway.address)
try:
    while True:
        time.sleep(1)
finally:
    gateway.stop()
    triton.stop()
EOF
  GATEWAY_PID=$!
  for _ in $(seq 1 300); do
    [[ -s "$WORK/address" ]] && break
    kill -0 "$GATEWAY_PID" 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
    sleep 1
  done
  TARGET="$(cat "$WORK/address")"
fi
echo "gateway: $TARGET"

for spec in "${SPECS[@]}"; do
  venv="$WORK/venv-$(echo "$spec" | tr -c 'a-z0-9' '_')"
  "$PYTHON" -m venv "$venv"
  # The SDK's own requirements decide the rest; pip must find a protobuf both allow.
  "$venv/bin/pip" install -q "$ROOT/client" "$spec" 2>&1 | grep -v "^WARNING: Location" || true
  (cd "$WORK" && "$venv/bin/python" - "$TARGET" <<'EOF')
import sys
import google.protobuf
import ragserve

target = sys.argv[1]
with ragserve.Client(target, timeout=60) as client:
    models = {m.name: m for m in client.list_models()}
    embedded = client.embed(["hello", "world"])
    ranked = client.rerank("capital of France", ["Berlin is in Germany.", "Paris is the capital of France."], raw_scores=True)
    assert embedded.embeddings.shape[0] == 2 and embedded.request_id
    assert ranked.results[0].index == 1 and 0 <= ranked.results[0].relevance_score <= 1 and ranked.results[0].raw_score is not None
    if any(m.kind == "generation" for m in models.values()):
        answer = client.generate("Hi", max_tokens=2, temperature=0, logprobs=True)
        assert len(answer.logprobs) == answer.usage.completion_tokens
print(f"protobuf {google.protobuf.__version__}: ok ({ragserve.__file__})")
EOF
done
echo "the SDK ran on every protobuf in: ${SPECS[*]}"
