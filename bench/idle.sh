#!/usr/bin/env bash
# Resident memory per idle mutual-TLS connection: N devices (default 5,000), each with its own
# certificate, connected by `tms-gateway simulate` (rumqttc) to the gateway, then the same N
# to a Mosquitto with the equivalent configuration, in the same run. Figure: (broker RSS with
# N idle connections − RSS once the devices are registered) / N, as a ratio gateway /
# Mosquitto. Appends to bench/results/idle.jsonl.
#
# simulate registers the devices and issues their certificates itself, in its own process
# (store and CA opened from the data directory), then dials. The gateway's RSS still grows
# a little meanwhile (file-backed pages, ~5 MB at 50,000), so the figure starts from the
# last reading before simulate says it dials (rss_kib_when_registered, ≤ 0.2 s before);
# rss_kib keeps the reading before simulate started. seconds_to_connect_all (from the start
# of simulate) includes seconds_registering.
#
# Above what this machine allows by default (N > ~19,000), the script, run as root, makes
# room: file descriptors (one socket per device on each side) up to fs.nr_open (raising the
# hard limit needs CAP_SYS_RESOURCE: without it, it stops at once and says how many devices
# fit), the gateway's mqtt.max_connections, and net.ipv4.ip_local_port_range (all devices
# dial 127.0.0.1 on one port, so each needs a source port of its own), restored on exit.
#
# Usage: bench/idle.sh [DEVICES]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}

# File descriptors: set before lib.sh starts anything, so that the gateway, Mosquitto and
# simulate inherit them (lib.sh raises the soft limit to the hard one).
FDS=$((N + 512))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$FDS" ]; then
    [ "$FDS" -le "$(cat /proc/sys/fs/nr_open)" ] || { echo "$N devices need $FDS fds, over fs.nr_open" >&2; exit 1; }
    ulimit -n "$FDS" 2>/dev/null || {
        echo "$N devices need $FDS fds a process; the hard limit is $(ulimit -Hn) and raising it needs" \
            "root with CAP_SYS_RESOURCE (at most $(($(ulimit -Hn) - 512)) devices here)" >&2
        exit 1
    }
fi
source bench/lib.sh
[ $((N + 1000)) -le "$TMS_MQTT_MAX_CONNECTIONS" ] || export TMS_MQTT_MAX_CONNECTIONS=$((N + 1000))

# Source ports: N, and a fifth more for connects retried while a closed one is in TIME_WAIT.
RANGE=/proc/sys/net/ipv4/ip_local_port_range
read -r lo hi <"$RANGE"
PORTS=$((N + N / 5 + 1000))
if [ $((hi - lo + 1)) -lt "$PORTS" ]; then
    [ "$PORTS" -le 64512 ] || { echo "$N devices need $PORTS source ports on one address" >&2; exit 1; }
    echo "$((65536 - PORTS)) 65535" >"$RANGE" || { echo "cannot widen $RANGE ($lo-$hi); run as root" >&2; exit 1; }
    AT_EXIT+="echo '$lo $hi' >$RANGE || true; "
    echo "ip_local_port_range $lo-$hi → $(tr '\t' - <"$RANGE") for this run" >&2
fi

start_gateway
start_mosquitto

# Waits (at most $2 seconds) until process $1 uses under a tenth of a core: with many idle
# connections their keep-alives keep its CPU time moving, so lib.sh's settle would not end.
calm() {
    local pid=$1 deadline=$((SECONDS + $2)) prev now
    now=$(cpu "$pid")
    while [ "$SECONDS" -lt "$deadline" ]; do
        prev=$now; sleep 1; now=$(cpu "$pid")
        [ $((now - prev)) -ge $((HZ / 10)) ] || return 0
    done
    echo "pid $pid still busy after $2 s; reading it anyway" >&2
}

# Connects N devices to port $2 and holds them idle (one telemetry message an hour); prints
# "<rss before> <rss registered> <rss after> (KiB) <seconds registering> <seconds to connect
# all>" for process $1. Gives up if not all are connected within $WAIT seconds.
WAIT=$((120 + N / 50))
hold() {
    local pid=$1 port=$2 log=$WORK/sim-$2.log
    local before registered="" last now after t0 t1 reg deadline=$((SECONDS + WAIT))
    before=$(rss_kib "$pid"); last=$before
    t0=$(date +%s.%N)
    "$BIN" simulate --devices "$N" --interval 3600 --duration $((WAIT + 600)) --mqtt "127.0.0.1:$port" 2>"$log" >/dev/null &
    local sim=$!
    until grep -q "connected $N/$N" "$log" 2>/dev/null; do
        kill -0 $sim 2>/dev/null || { echo "simulate ended early: $(tail -3 "$log")" >&2; exit 1; }
        [ "$SECONDS" -lt "$deadline" ] || { echo "not all connected in $WAIT s: $(tail -1 "$log")" >&2; kill $sim; exit 1; }
        if [ -z "$registered" ]; then   # the last reading taken before simulate said it dials
            now=$(rss_kib "$pid")
            if grep -q "certificates in" "$log"; then registered=$last; else last=$now; fi
        fi
        sleep 0.2
    done
    t1=$(date +%s.%N)
    reg=$(sed -n "s/^$N certificates in \([0-9.]*\)\(m\?s\);.*/\1 \2/p" "$log")
    calm "$pid" 120; sleep 2
    after=$(rss_kib "$pid")
    kill -INT $sim; wait $sim 2>/dev/null || true
    calm "$pid" 120   # the closed sessions' work done before the other broker's turn
    python3 -c "r='$reg'.split(); print($before, ${registered:-$before}, $after, round(float(r[0])/(1000 if r[1]=='ms' else 1),1), round($t1-$t0,1))"
}

echo "registering $N devices and connecting them to the gateway…" >&2
read -r g0 gr g1 greg gt < <(hold "$GW_PID" "$GW_PORT")
echo "gateway: RSS $g0 → $g1 KiB with $N connections ($gr when registered; ${greg} s registering, all connected in ${gt} s)" >&2
read -r m0 mr m1 mreg mt < <(hold "$MQ_PID" "$MQ_PORT")
echo "mosquitto: RSS $m0 → $m1 KiB with $N connections ($mr when registered; ${mreg} s registering, all connected in ${mt} s)" >&2

python3 - "$N" "$g0" "$g1" "$m0" "$m1" "$gt" "$mt" "$(mosquitto_version)" "$gr" "$mr" "$greg" "$mreg" <<'PY'
import json, sys, datetime, platform, os
n, g0, g1, m0, m1 = (int(x) for x in sys.argv[1:6])
gt, mt, mosq = float(sys.argv[6]), float(sys.argv[7]), sys.argv[8]
gr, mr, greg, mreg = int(sys.argv[9]), int(sys.argv[10]), float(sys.argv[11]), float(sys.argv[12])
g, m = (g1 - gr) / n, (m1 - mr) / n
rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": f"{platform.machine()} {os.cpu_count()} cores", "mosquitto": mosq, "connections": n,
       "rss_kib": {"gateway": [g0, g1], "mosquitto": [m0, m1]},
       "kib_per_idle_connection": {"gateway": round(g, 2), "mosquitto": round(m, 2)},
       "ratio_gateway_over_mosquitto": round(g / m, 2) if m > 0 else None,
       "seconds_to_connect_all": {"gateway": gt, "mosquitto": mt},
       "rss_kib_when_registered": {"gateway": gr, "mosquitto": mr},
       "seconds_registering": {"gateway": greg, "mosquitto": mreg}}
open("bench/results/idle.jsonl", "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
