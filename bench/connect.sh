#!/usr/bin/env bash
# Connect cost: CERTS devices (default 400), each with its own certificate, make full
# connects — TCP, TLS 1.3 handshake with the device's certificate (no resumption), MQTT 3.1.1
# CONNECT (client id = serial, clean session, keep-alive 60), CONNACK checked, DISCONNECT,
# close — from CONCURRENCY client threads (default 8, bench/connect.py), each certificate
# once per round, to the gateway (SQLite ingest on, so its presence writes count) and to a
# Mosquitto with the equivalent configuration, in the same run with the same client. The
# brokers take turns, three rounds, median kept (as bench/run.sh).
#
# Figures: broker CPU µs per connect (utime + stime from /proc/<pid>/stat, counted until the
# broker's CPU time settles; 10 ms ticks, so 400 connects resolve to a few per cent), the
# ratio gateway / Mosquitto, client-side latency from TCP connect to CONNACK (p50 and p99
# over all rounds' connects) per broker, and failed connects (the target is 0). The client
# shares the 2-core box, so latency includes waiting for a core; CPU per connect does not.
# Appends one line to bench/results/connect.jsonl.
#
# Usage: bench/connect.sh [CERTS] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
CERTS=${1:-400}
CONCURRENCY=${2:-8}
ROUNDS=3
source bench/lib.sh

# Registration before the brokers start, so that none of it lands in their CPU counters.
echo "registering $CERTS devices" >&2
mkdir -p "$WORK/dev" "$WORK/warm"
for i in $(seq "$CERTS"); do
    s=$(printf "CONN%05d" "$i")
    "$BIN" device add --serial "$s" --mac "$(printf "02:43:4E:00:%02X:%02X" $((i / 256)) $((i % 256)))" --company Connect >/dev/null
    "$BIN" device cert "$s" --out "$WORK/dev/$s" >/dev/null
    if [ "$i" -le 16 ]; then ln -s "$WORK/dev/$s" "$WORK/warm/$s"; fi
done
start_gateway
start_mosquitto

run_round() { # name pid port devdir → "<cpu µs per connect> <connects> <failures> <wall s>"
    local name=$1 pid=$2 port=$3 dir=$4 c0 c1 out n fails wall
    c0=$(cpu "$pid")
    out=$(python3 bench/connect.py "$port" "$dir" "$CONCURRENCY" "$WORK/lat.$name" 2>>"$WORK/client.err")
    read -r n fails wall <<<"$out"
    # The broker's work ends after the client's: the gateway records each disconnect.
    c1=$(settle "$pid")
    python3 -c "print(f'{(($c1-$c0)/$HZ)/$n*1e6:.1f} $n $fails $wall')"
}

echo "warming up" >&2
run_round warm "$GW_PID" "$GW_PORT" "$WORK/warm" >/dev/null
run_round warm "$MQ_PID" "$MQ_PORT" "$WORK/warm" >/dev/null
rm -f "$WORK/lat.warm"

rounds=()
for r in $(seq "$ROUNDS"); do
    for broker in gateway mosquitto; do
        if [ $broker = gateway ]; then pid=$GW_PID; port=$GW_PORT; else pid=$MQ_PID; port=$MQ_PORT; fi
        out=$(run_round $broker "$pid" "$port" "$WORK/dev")
        read -r us n fails wall <<<"$out"
        [ -n "${wall:-}" ] || { echo "round $r $broker: no result (see $WORK/client.err)" >&2; cat "$WORK/client.err" >&2; exit 1; }
        echo "round $r $broker: $us µs CPU per connect, $n connects in $wall s, $fails failed" >&2
        rounds+=("$broker $us $n $fails $wall")
    done
done
if [ -s "$WORK/client.err" ]; then echo "first client errors:" >&2; head -n 10 "$WORK/client.err" >&2; fi

python3 - "$CERTS" "$CONCURRENCY" "$WORK" "$(mosquitto_version)" "${rounds[@]}" <<'PY'
import datetime, json, math, os, platform, statistics, sys
certs, conc, work, mosq = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = {"gateway": [], "mosquitto": []}
for line in sys.argv[5:]:
    broker, us, n, fails, wall = line.split()
    runs[broker].append((float(us), int(n), int(fails), float(wall)))

def pct(xs, p):  # nearest rank
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] if xs else None

cpu, lat, failed, rate = {}, {}, {}, {}
for broker, rs in runs.items():
    cpu[broker] = statistics.median(r[0] for r in rs)
    failed[broker] = sum(r[2] for r in rs)
    rate[broker] = round(statistics.median(r[1] / r[3] for r in rs))
    path = os.path.join(work, "lat." + broker)
    xs = sorted(int(l) for l in open(path)) if os.path.exists(path) else []
    lat[broker] = {"p50": pct(xs, 50), "p99": pct(xs, 99), "n": len(xs)}
rec = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": f"{platform.machine()} {os.cpu_count()} cores", "mosquitto": mosq,
    "certs": certs, "concurrency": conc, "rounds": len(runs["gateway"]),
    "cpu_us_per_connect": cpu,
    "cpu_us_per_connect_rounds": {b: [r[0] for r in rs] for b, rs in runs.items()},
    "ratio_gateway_over_mosquitto": round(cpu["gateway"] / cpu["mosquitto"], 2) if cpu["mosquitto"] > 0 else None,
    "client_latency_us": lat,
    "connects_per_s": rate,
    "failed_connects": failed,
}
open("bench/results/connect.jsonl", "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
