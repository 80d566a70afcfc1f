#!/usr/bin/env bash
# The appliance vs LiteLLM proxy (1 and 2 workers) vs direct-to-mock, in ONE run of the shared overhead
# harness (../shared/bench/overhead.sh), so the ratios come from the same minutes of the same machine.
#   tests/perf/vs_litellm.sh                           # defaults: 3 rounds x 5 s, c=1,16,64 + stream c=16
#   tests/perf/vs_litellm.sh --litellm-workers 2 --rounds 5
# Any overhead.py flag passes through (see: /tmp/bench-venv/bin/python ../shared/bench/overhead.py --help).
# Env: APPLIANCE_PYTHON (default /tmp/devenv/bin/python), APPLIANCE_BIN (bench a built binary instead),
#      APPLIANCE_WORKERS (default 2), BENCH_HARNESS (default ../shared/bench beside the checkout).
# Results: tests/perf/results/<UTC time>-vs-litellm.{json,md}; server logs in /tmp/bench-logs/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
harness=${BENCH_HARNESS:-$(cd "$here/../../.." && pwd)/shared/bench}
python=${APPLIANCE_PYTHON:-/tmp/devenv/bin/python}
key=sk-app-bench-0000000000000000
work=$(mktemp -d /tmp/appliance-vs-litellm.XXXXXX)
trap 'rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# MOCK_BASE_URL (http://127.0.0.1:<mock port>/v1) is exported by overhead.py to the --target-cmd and
# interpolated by the appliance's config loader. overhead.py sends model "mock" (LiteLLM's model_name),
# so the appliance gets the alias mock -> mock/mock-model (one more dict lookup than a plain name).
cat > "$work/appliance.toml" <<TOML
[server]
host = "127.0.0.1"
port = $port
workers = ${APPLIANCE_WORKERS:-2}
data_dir = "$work/data"

[discovery]
enabled = false

[[backends]]
name = "mock"
url = "\${MOCK_BASE_URL}"

[[models]]
name = "mock"
target = "mock/mock-model"
TOML

if [ -n "${APPLIANCE_BIN:-}" ]; then
  start="$APPLIANCE_BIN serve --config $work/appliance.toml"
else
  start="$python -m appliance serve --config $work/appliance.toml"
fi
"$harness/overhead.sh" \
  --target "appliance=http://127.0.0.1:$port" \
  --target-key "appliance=$key" \
  --target-cmd "appliance=export APPLIANCE_ADMIN_KEY=$key; exec $start" \
  --out "$here/results" --tag vs-litellm \
  "$@"
