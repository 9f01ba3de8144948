#!/usr/bin/env bash
# Resident memory per idle mutual-TLS connection: N devices (default 5,000), each with its own
# certificate, connected by `tms-gateway simulate` (rumqttc) to the gateway, then the same N
# to a Mosquitto with the equivalent configuration, in the same run. Figure: (broker RSS with
# N idle connections − RSS before) / N, as a ratio gateway / Mosquitto. Appends to
# bench/results/idle.jsonl.
#
# Usage: bench/idle.sh [DEVICES]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
source bench/lib.sh
start_gateway
start_mosquitto

# Connects N devices to port $2 and holds them idle (one telemetry message an hour); prints
# "<rss before KiB> <rss after KiB> <seconds to connect all>" for process $1.
hold() {
    local pid=$1 port=$2 log=$WORK/sim-$2.log
    local before after t0
    before=$(rss_kib "$pid")
    t0=$(date +%s.%N)
    "$BIN" simulate --devices "$N" --interval 3600 --duration 600 --mqtt "127.0.0.1:$port" 2>"$log" >/dev/null &
    local sim=$!
    until grep -q "connected $N/$N" "$log" 2>/dev/null; do
        kill -0 $sim 2>/dev/null || { echo "simulate ended early: $(tail -3 "$log")" >&2; exit 1; }
        sleep 0.5
    done
    local t1; t1=$(date +%s.%N)
    settle "$pid" >/dev/null; sleep 2
    after=$(rss_kib "$pid")
    kill -INT $sim; wait $sim 2>/dev/null || true
    echo "$before $after $(python3 -c "print(round($t1-$t0,1))")"
}

echo "registering $N devices and connecting them to the gateway…" >&2
read -r g0 g1 gt < <(hold "$GW_PID" "$GW_PORT")
echo "gateway: RSS $g0 → $g1 KiB with $N connections (all connected in ${gt} s)" >&2
read -r m0 m1 mt < <(hold "$MQ_PID" "$MQ_PORT")
echo "mosquitto: RSS $m0 → $m1 KiB with $N connections (all connected in ${mt} s)" >&2

python3 - "$N" "$g0" "$g1" "$m0" "$m1" "$gt" "$mt" "$(mosquitto_version)" <<'PY'
import json, sys, datetime, platform, os
n, g0, g1, m0, m1 = (int(x) for x in sys.argv[1:6])
gt, mt, mosq = float(sys.argv[6]), float(sys.argv[7]), sys.argv[8]
g, m = (g1 - g0) / n, (m1 - m0) / n
rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": f"{platform.machine()} {os.cpu_count()} cores", "mosquitto": mosq, "connections": n,
       "rss_kib": {"gateway": [g0, g1], "mosquitto": [m0, m1]},
       "kib_per_idle_connection": {"gateway": round(g, 2), "mosquitto": round(m, 2)},
       "ratio_gateway_over_mosquitto": round(g / m, 2) if m > 0 else None,
       "seconds_to_connect_all": {"gateway": gt, "mosquitto": mt}}
open("bench/results/idle.jsonl", "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
