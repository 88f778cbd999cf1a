#!/usr/bin/env bash
# The whole stack on this machine: a demo vendor API, latchkey, Envoy. State (master key,
# admin token, database, logs) lives in .latchkey/, created on the first run. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."

state=.latchkey
mkdir -p "$state"
chmod 700 "$state"
bin=target/debug/latchkey
[ -s "$state/master.key" ] || (umask 077 && "$bin" keygen > "$state/master.key")
[ -s "$state/admin.token" ] || (umask 077 && "$bin" keygen > "$state/admin.token")

export LATCHKEY_MASTER_KEY_FILE="$state/master.key"
export LATCHKEY_ADMIN_TOKEN="$(cat "$state/admin.token")"
export LATCHKEY_DATABASE_URL="sqlite://$state/latchkey.db"
# The demo's own secrets: the vendor's real key, and the key the agent gets instead.
export DEMO_SECRET="sk_demo_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export DEMO_AGENT_KEY="lk_demo$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# LATCHKEY_IN_PROCESS=1 (`make run-inprocess`): the data plane runs inside Envoy, fed
# over an owner-only socket in $state/.
config=envoy/envoy.yaml
if [ -n "${LATCHKEY_IN_PROCESS:-}" ]; then
  config=envoy/envoy-inprocess.yaml
  export LATCHKEY_MODULE_SOCKET="$state/module.sock"
  export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$PWD/target/debug"
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

python3 examples/demo_upstream.py > "$state/demo-upstream.log" 2>&1 & pids+=($!)
"$bin" serve > "$state/latchkey.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:9464/readyz > /dev/null && break
  sleep 0.1
done
curl -sf http://127.0.0.1:9464/readyz > /dev/null || { cat "$state/latchkey.log"; exit 1; }
"$bin" apply -f examples/policy.yaml

.venv/bin/envoy -c "$config" --disable-hot-restart --concurrency 1 \
  > "$state/envoy.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:9901/ready > /dev/null && break
  sleep 0.1
done
curl -sf http://127.0.0.1:9901/ready > /dev/null || { tail -20 "$state/envoy.log"; exit 1; }

cat <<MSG

latchkey is up: Envoy on :10000, latchkey ext_proc :50051, admin :50052, metrics :9464.
The ext_proc port answers only Envoy: mutual TLS with the certificates latchkey minted
in $state/tls/ (its answers carry the real credentials).
The agent holds only its proxy key; the demo vendor checks for its real secret:

  curl -s http://127.0.0.1:10000/demo/v1/hello -H "Authorization: Bearer $DEMO_AGENT_KEY"

A write is outside the agent's rules (403 rule_denied):

  curl -s -X POST http://127.0.0.1:10000/demo/v1/hello -H "Authorization: Bearer $DEMO_AGENT_KEY"

Logs are in $state/. Ctrl-C stops everything.
MSG
wait
