#!/usr/bin/env bash
# One latency phase alone, with the gateway's ingest metrics read at its end: where the
# PUBLISH → PUBACK time goes (commits, time in commits, messages per commit). Five paho
# publishers (bench/latency.py) at RATE/5 each for SECONDS; no Mosquitto. Try a batch window
# with TMS_INGEST_FLUSH_INTERVAL_MS=1.
#
# Usage: bench/latmetrics.sh [RATE] [SECONDS]    (defaults 5000, 10)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-5000}
SECONDS_EACH=${2:-10}
source bench/lib.sh
for i in 1 2 3 4 5; do
    "$BIN" device add --serial "LAT000$i" --mac "02:4C:41:00:00:0$i" --company Latency >/dev/null
    "$BIN" device cert "LAT000$i" --out "$WORK/dev/LAT000$i" >/dev/null
done
start_gateway
pids=()
for i in 1 2 3 4 5; do
    python3 bench/latency.py localhost "$GW_PORT" "$WORK/dev/LAT000$i" "LAT000$i" \
        "$(python3 -c "print($RATE/5)")" "$SECONDS_EACH" >"$WORK/o$i.json" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
settle "$GW_PID" >/dev/null
curl -s "http://$GW_HTTP/metrics" | grep -E '^tms_ingest_(commit_duration_seconds|batch_rows)_(sum|count)'
python3 - "$WORK" <<'PY'
import glob, json, sys
us = sorted(x for f in glob.glob(f"{sys.argv[1]}/o*.json") for x in json.load(open(f))["us"])
print(f"messages {len(us)}  p50 {us[len(us) // 2]:.0f} us  p99 {us[int(.99 * len(us))]:.0f} us")
PY
