#!/usr/bin/env bash
# QoS 1 flood: P publishers (default 50), each its own device with its own certificate, each
# sending M messages (default 2,000) as fast as mosquitto_pub -l goes, all at once — first to
# the gateway (SQLite ingest on), then to a Mosquitto with the equivalent configuration.
# Figures: messages the gateway stored of those sent (the target is all of them: a full
# ingest queue holds PUBACKs back instead of dropping), and broker CPU per message as a ratio
# gateway / Mosquitto. Appends to bench/results/flood.jsonl.
#
# Usage: bench/flood.sh [PUBLISHERS] [MESSAGES_EACH]
set -euo pipefail
cd "$(dirname "$0")/.."
P=${1:-50}
M=${2:-2000}
source bench/lib.sh

echo "registering $P devices" >&2
for i in $(seq -f "%02g" 1 "$P"); do
    "$BIN" device add --serial "FLOOD00$i" --mac "02:46:4C:00:00:$(printf %02X "$((10#$i))")" --company Flood >/dev/null
    "$BIN" device cert "FLOOD00$i" --out "$WORK/dev/FLOOD00$i" >/dev/null
done
telemetry_lines "$M" >"$WORK/payload.txt"
start_gateway
start_mosquitto

flood() { # pid port → "<cpu µs per message> <seconds> <publisher failures>"
    local pid=$1 port=$2 c0 t0 fails=0 pids=()
    c0=$(cpu "$pid"); t0=$(date +%s.%N)
    for d in "$WORK"/dev/FLOOD*; do
        s=$(basename "$d")
        mosquitto_pub -h localhost -p "$port" --cafile "$d/ca.pem" --cert "$d/$s.pem" --key "$d/$s.key" \
            -i "$s" -t "tms/$s/telemetry" -q 1 -l <"$WORK/payload.txt" 2>>"$WORK/pub.err" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
    local t1; t1=$(date +%s.%N)
    local c1; c1=$(settle "$pid")
    python3 -c "print(f'{(($c1-$c0)/$HZ)/($P*$M)*1e6:.2f} {$t1-$t0:.2f} $fails')"
}

echo "flooding the gateway: $P × $M QoS 1" >&2
read -r g_us g_s g_fail < <(flood "$GW_PID" "$GW_PORT")
STORED=$(python3 -c "import sqlite3;print(sqlite3.connect('$TMS_DATA_DIR/tms.db').execute(\"select count(*) from telemetry where serial like 'FLOOD%'\").fetchone()[0])")
echo "gateway: $g_us µs CPU/msg, ${g_s} s, stored $STORED of $((P * M)), $g_fail publishers failed" >&2
echo "flooding mosquitto: $P × $M QoS 1" >&2
read -r m_us m_s m_fail < <(flood "$MQ_PID" "$MQ_PORT")
echo "mosquitto: $m_us µs CPU/msg, ${m_s} s, $m_fail publishers failed" >&2

python3 - "$P" "$M" "$STORED" "$g_us" "$g_s" "$g_fail" "$m_us" "$m_s" "$m_fail" "$(mosquitto_version)" <<'PY'
import json, sys, datetime, platform, os
p, m, stored = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g_us, g_s, g_fail, m_us, m_s, m_fail = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9])
rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": f"{platform.machine()} {os.cpu_count()} cores", "mosquitto": sys.argv[10],
       "publishers": p, "messages_each": m, "sent": p * m, "gateway_stored": stored, "lost": p * m - stored,
       "publisher_failures": {"gateway": g_fail, "mosquitto": m_fail},
       "cpu_us_per_msg": {"gateway": g_us, "mosquitto": m_us},
       "ratio_gateway_over_mosquitto": round(g_us / m_us, 2) if m_us > 0 else None,
       "msgs_per_s": {"gateway": round(p * m / g_s), "mosquitto": round(p * m / m_s)}}
open("bench/results/flood.jsonl", "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
