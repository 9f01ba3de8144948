#!/usr/bin/env bash
# Side-by-side benchmark: tms-gateway (release build, SQLite ingest on) against a Mosquitto
# started here with the equivalent mutual-TLS configuration, driven by the same third-party
# client (mosquitto_pub from Debian's mosquitto-clients), in the same run.
#
# The load generator shares the 2-core box with the broker, so the figure that compares is
# the broker process's own CPU time per operation (utime + stime from /proc/<pid>/stat),
# reported as a ratio gateway / Mosquitto. Results are appended to bench/results/*.jsonl.
#
# Usage: bench/run.sh [CONNECTS] [MESSAGES]      (defaults 400 and 50000)
# Keep MESSAGES below 65535: Debian's mosquitto_pub 2.0.11 in -l mode with QoS 1 stops
# sending after its message ids wrap (seen against Mosquitto itself too).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTS=${1:-400}
MESSAGES=${2:-50000}

command -v mosquitto >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; }
command -v mosquitto_pub >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto-clients >/dev/null; }

cargo build --release --locked -p tms-gateway >&2
BIN=$PWD/target/release/tms-gateway
WORK=$(mktemp -d)
trap 'kill $GW_PID $MQ_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT

export TMS_DATA_DIR=$WORK/gw TMS_MQTT_LISTEN=127.0.0.1:0 TMS_HTTP_LISTEN=127.0.0.1:0 TMS_MQTT_HOSTNAMES=localhost
export RUST_LOG=warn
"$BIN" device add --serial BENCH0001 --mac 02:42:00:00:00:01 --company Bench >/dev/null
"$BIN" device cert BENCH0001 --out "$WORK/dev" >/dev/null
"$BIN" serve 2>"$WORK/gw.log" &
GW_PID=$!
for _ in $(seq 100); do [ -f "$TMS_DATA_DIR/ports.json" ] && break; sleep 0.1; done
GW_PORT=$(python3 -c "import json,sys;print(json.load(open('$TMS_DATA_DIR/ports.json'))['mqtt'].rsplit(':',1)[1])")

# Mosquitto with the same CA and server certificate, as close to the gateway's settings as it
# gets: client certificate required, identity as user name, TCP_NODELAY, no persistence.
MQ_PORT=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
cat > "$WORK/mosquitto.conf" <<CONF
user root
per_listener_settings false
persistence false
max_queued_messages 1000000
max_inflight_messages 100
listener $MQ_PORT 127.0.0.1
cafile $TMS_DATA_DIR/ca/ca.pem
certfile $TMS_DATA_DIR/server/server.pem
keyfile $TMS_DATA_DIR/server/server.key
require_certificate true
use_identity_as_username true
set_tcp_nodelay true
allow_anonymous false
CONF
mosquitto -c "$WORK/mosquitto.conf" 2>"$WORK/mq.log" &
MQ_PID=$!
sleep 0.5

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # clock ticks
HZ=$(getconf CLK_TCK)
TLS=(--cafile "$WORK/dev/ca.pem" --cert "$WORK/dev/BENCH0001.pem" --key "$WORK/dev/BENCH0001.key" -i BENCH0001)

connects() { # port
    for _ in $(seq "$CONNECTS"); do
        mosquitto_pub -h localhost -p "$1" "${TLS[@]}" -t tms/BENCH0001/status -m online -q 0
    done
}
messages() { # port qos
    python3 - "$MESSAGES" <<'PY' | mosquitto_pub -h localhost -p "$1" "${TLS[@]}" -t tms/BENCH0001/telemetry -q "$2" -l
import sys
for n in range(int(sys.argv[1])):
    print('{"mode":"online","load_pct":%d,"battery":{"charge_pct":100,"runtime_min":40},"input":{"voltage":229.8,"frequency_hz":50}}' % (n % 100))
PY
}
measure() { # name pid count command...
    local name=$1 pid=$2 count=$3; shift 3
    local c0 t0 c1 t1
    c0=$(cpu "$pid"); t0=$(date +%s.%N)
    "$@"
    # Count the broker's work until it is done with what the client handed over (the
    # gateway's ingest commits): its CPU time has stopped moving for half a second.
    local prev=-1 now
    now=$(cpu "$pid")
    while [ "$now" != "$prev" ]; do prev=$now; sleep 0.5; now=$(cpu "$pid"); done
    c1=$now; t1=$(date +%s.%N)
    python3 -c "print(f'{(($c1-$c0)/$HZ)/$count*1e6:.2f} {$t1-$t0:.2f}')"
}

echo "warming up" >&2
connects "$GW_PORT" >/dev/null 2>&1 || true
CONNECTS_SAVED=$CONNECTS; CONNECTS=20; connects "$MQ_PORT"; CONNECTS=$CONNECTS_SAVED

results=()
for figure in connect qos0 qos1; do
    for broker in gateway mosquitto; do
        if [ $broker = gateway ]; then pid=$GW_PID; port=$GW_PORT; else pid=$MQ_PID; port=$MQ_PORT; fi
        case $figure in
            connect) r=$(measure $figure $pid "$CONNECTS" connects "$port") ;;
            qos0) r=$(measure $figure $pid "$MESSAGES" messages "$port" 0) ;;
            qos1) r=$(measure $figure $pid "$MESSAGES" messages "$port" 1) ;;
        esac
        echo "$figure $broker: ${r% *} µs CPU per op (wall ${r#* } s)" >&2
        results+=("$figure $broker ${r% *}")
    done
done

STORED=$(python3 - <<PY
import sqlite3
print(sqlite3.connect("$TMS_DATA_DIR/tms.db").execute("select count(*) from telemetry where serial='BENCH0001'").fetchone()[0])
PY
)
OUT=bench/results/$(date -u +%Y-%m-%d).jsonl
python3 - "$OUT" "$CONNECTS" "$MESSAGES" "$STORED" "${results[@]}" <<'PY'
import json, sys, platform, subprocess, datetime
out, connects, messages, stored = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = {}
for line in sys.argv[5:]:
    fig, broker, v = line.split()
    r.setdefault(fig, {})[broker] = float(v)
mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
rec = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": f"{platform.machine()} {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
    "mosquitto": mosq,
    "connects": connects, "messages": messages,
    "telemetry_rows_stored": stored,
    "cpu_us_per_op": r,
    "ratio_gateway_over_mosquitto": {k: round(v["gateway"] / v["mosquitto"], 2) for k, v in r.items()},
}
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
