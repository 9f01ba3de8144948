#!/usr/bin/env bash
# Reconnect storm (issue #17): N devices dial a release gateway (SQLite) at the same instant
# with `tms-gateway simulate --storm`, and dial again after a jittered back-off when a
# connect fails. Reports the CONNACK -> online latency p50/p99
# (tms_presence_online_latency_seconds), the time from the release of the devices until the
# store has all N online (tms_devices{state="online"} on /metrics, polled every 0.1 s) and
# until the last CONNACK, and the clients' connect time-outs, as one JSON line appended to
# bench/results/storm.jsonl.
#
# Usage: bench/storm.sh [DEVICES]                           (default: 10000)
#        BIN=target/debug/tms-gateway bench/storm.sh 50     (a smoke run, no release build)
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # one socket per device on each side
N=${1:-10000}
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked -p tms-gateway >&2
    BIN=$PWD/target/release/tms-gateway
fi
WORK=$(mktemp -d)
GW="" SIM=""
trap 'kill $GW $SIM 2>/dev/null || true; rm -rf "$WORK"' EXIT
export TMS_DATA_DIR=$WORK TMS_MQTT_LISTEN=127.0.0.1:0 TMS_HTTP_LISTEN=127.0.0.1:0 RUST_LOG=warn
export TMS_MQTT_MAX_CONNECTIONS=$((N + 1000))
"$BIN" serve 2>"$WORK/serve.log" &
GW=$!
for _ in $(seq 300); do [ -f "$WORK/ports.json" ] && break; sleep 0.1; done
HTTP=$(python3 -c "import json;print(json.load(open('$WORK/ports.json'))['http'])")
# Long interval: this measures connects and presence, not message load; the run lasts long
# enough for the whole fleet to arrive and the back-off of the stragglers to play out.
"$BIN" simulate --storm --devices "$N" --interval 60 --duration $((N / 200 + 30)) \
    >"$WORK/sim.out" 2>"$WORK/sim.log" &
SIM=$!
python3 bench/storm.py watch "$N" "http://$HTTP/metrics" "$WORK/sim.log" "$SIM" >"$WORK/watch.json"
wait "$SIM" || true
SIM=""
curl -s "http://$HTTP/metrics" >"$WORK/metrics.txt"
kill "$GW"; wait "$GW" 2>/dev/null || true
GW=""
python3 bench/storm.py report "$N" "$WORK/metrics.txt" "$WORK/sim.out" "$WORK/watch.json"
cp "$WORK/serve.log" "/tmp/storm-serve-$N.log" 2>/dev/null || true
cp "$WORK/sim.log" "/tmp/storm-sim-$N.log" 2>/dev/null || true
cp "$WORK/metrics.txt" "/tmp/storm-metrics-$N.txt" 2>/dev/null || true
