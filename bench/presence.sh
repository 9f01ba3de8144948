#!/usr/bin/env bash
# Status latency with many connected devices: how long after CONNACK a device is visible as
# online in the store (tms_presence_online_latency_seconds), for 2,000 and 10,000 devices
# connected by `tms-gateway simulate` against a release build with SQLite.
#
# Usage: bench/presence.sh [DEVICES...]     (default: 2000 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # one socket per device on each side
cargo build --release --locked -p tms-gateway >&2
BIN=$PWD/target/release/tms-gateway
for N in "${@:-2000 10000}"; do
    for n in $N; do
        WORK=$(mktemp -d)
        export TMS_DATA_DIR=$WORK TMS_MQTT_LISTEN=127.0.0.1:0 TMS_HTTP_LISTEN=127.0.0.1:0 RUST_LOG=warn
        export TMS_MQTT_MAX_CONNECTIONS=20000
        "$BIN" serve 2>"$WORK/serve.log" &
        GW=$!
        for _ in $(seq 100); do [ -f "$WORK/ports.json" ] && break; sleep 0.1; done
        HTTP=$(python3 -c "import json;print(json.load(open('$WORK/ports.json'))['http'])")
        # Long interval: this measures connects and presence, not message load.
        "$BIN" simulate --devices "$n" --interval 60 --duration $((n / 200 + 20)) 2>"$WORK/sim.log" >"$WORK/sim.out" || true
        curl -s "http://$HTTP/metrics" >"$WORK/metrics.txt"
        kill $GW; wait $GW 2>/dev/null || true
        python3 - "$n" "$WORK/metrics.txt" "$WORK/sim.out" <<'PY'
import sys, json, datetime
sys.path.insert(0, "bench")
sys.dont_write_bytecode = True
from histogram import summary_ms
n, path, sim = int(sys.argv[1]), sys.argv[2], open(sys.argv[3]).read().strip()
latency = summary_ms(open(path).read(), "tms_presence_online_latency_seconds")
rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "devices": n, "connected_sessions_measured": latency["count"],
       "online_latency_p50_ms": latency["p50_ms"], "online_latency_p99_ms": latency["p99_ms"],
       "simulate": sim}
open("bench/results/presence.jsonl", "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec))
PY
        cp "$WORK/serve.log" "/tmp/presence-serve-$n.log" 2>/dev/null || true; cp "$WORK/sim.log" "/tmp/presence-sim-$n.log" 2>/dev/null || true
        rm -rf "$WORK"
    done
done
