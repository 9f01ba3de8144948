#!/usr/bin/env bash
# Latency at a fixed message rate: QoS 1 PUBLISH → PUBACK round trip seen by the client, at
# 1,000 and 5,000 msg/s (5 publishers, each its own device and certificate, paho-mqtt from
# PyPI), against the gateway (SQLite ingest on; the PUBACK leaves once the message is committed
# to the store) and a Mosquitto with the equivalent configuration, in the same run.
# Figures: p50 / p99 / p99.9 per broker and rate, ratio gateway / Mosquitto at p99.
# Appends to bench/results/latency.jsonl.
#
# Usage: bench/latency.sh [SECONDS_PER_RATE] [RATES...]    (defaults 10 s; 1000 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-10}
shift || true
RATES=("${@:-1000 5000}")
PUBLISHERS=5
python3 -c "import paho.mqtt" 2>/dev/null \
    || python3 -m pip install -q "paho-mqtt>=2,<3" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "paho-mqtt>=2,<3" 2>/dev/null \
    || { apt-get update -qq && apt-get install -y -qq python3-paho-mqtt >/dev/null; }
source bench/lib.sh

for i in $(seq 1 $PUBLISHERS); do
    "$BIN" device add --serial "LAT000$i" --mac "02:4C:41:00:00:0$i" --company Latency >/dev/null
    "$BIN" device cert "LAT000$i" --out "$WORK/dev/LAT000$i" >/dev/null
done
start_gateway
start_mosquitto

run_rate() { # port rate → one JSON line per publisher in $WORK/lat-<port>-<rate>.jsonl
    local out=$WORK/lat-$1-$2.jsonl pids=()
    : >"$out"
    for i in $(seq 1 $PUBLISHERS); do
        python3 bench/latency.py localhost "$1" "$WORK/dev/LAT000$i" "LAT000$i" \
            "$(python3 -c "print($2/$PUBLISHERS)")" "$SECONDS_EACH" >>"$out" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    echo "$out"
}

files=()
for rate in ${RATES[*]}; do
    for broker in gateway mosquitto; do
        if [ $broker = gateway ]; then port=$GW_PORT; pid=$GW_PID; else port=$MQ_PORT; pid=$MQ_PID; fi
        echo "$broker at $rate msg/s for $SECONDS_EACH s" >&2
        f=$(run_rate "$port" "$rate")
        settle "$pid" >/dev/null
        files+=("$broker:$rate:$f")
    done
done

python3 - "$(mosquitto_version)" "${files[@]}" <<'PY'
import json, sys, datetime, platform, os
def pct(xs, q):
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 0) if xs else None
res = {}
for spec in sys.argv[2:]:
    broker, rate, path = spec.split(":", 2)
    rows = [json.loads(l) for l in open(path)]
    us = sorted(x for r in rows for x in r["us"])
    sent, acked = sum(r["sent"] for r in rows), sum(r["acked"] for r in rows)
    res.setdefault(rate, {})[broker] = {"sent": sent, "acked": acked, "p50_us": pct(us, .5), "p99_us": pct(us, .99), "p999_us": pct(us, .999), "max_us": round(us[-1]) if us else None}
for rate, r in res.items():
    if r.get("mosquitto", {}).get("p99_us"):
        r["p99_ratio_gateway_over_mosquitto"] = round(r["gateway"]["p99_us"] / r["mosquitto"]["p99_us"], 2)
rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": f"{platform.machine()} {os.cpu_count()} cores", "mosquitto": sys.argv[1],
       "measure": "QoS 1 PUBLISH -> PUBACK at the client (paho-mqtt), 5 publishers", "by_rate": res}
open("bench/results/latency.jsonl", "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
