#!/usr/bin/env bash
# Three gateway nodes on one PostgreSQL behind HAProxy (TCP mode) on this machine, with N
# devices simulated by `tms-gateway simulate` through the balancer (docs/cluster.md):
#   - connect rate: from the first connect until all N are online in the database;
#   - ingest: telemetry rows per second into PostgreSQL, CPU ms per message of each node
#     and of PostgreSQL itself (every postgres process on the machine);
#   - kill -9 of the node holding most devices: time until every device is online again on
#     the other two (node_lost detection + reconnect through the balancer).
#
# Usage: bench/cluster.sh [DEVICES] [INTERVAL_SECS]   (default 3000 devices, 1 s)
# Env:   TMS_BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test; a fresh
#        schema is made in it), PROFILE=debug to skip the release build (smoke runs only),
#        KEEP_WORK=1 to keep the nodes' logs.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
INTERVAL=${2:-1}
BASE=${TMS_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
command -v haproxy >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy >/dev/null; }
command -v psql >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql-client >/dev/null; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # one socket per device on each side

if [ "${PROFILE:-release}" = debug ]; then
    cargo build --locked -p tms-gateway >&2
    BIN=$PWD/target/debug/tms-gateway
else
    cargo build --release --locked -p tms-gateway >&2
    BIN=$PWD/target/release/tms-gateway
fi
WORK=$(mktemp -d)
PIDS=()
LB_PID=""
SIM_PID=""
cleanup() {
    for p in "${PIDS[@]}" $LB_PID $SIM_PID; do kill "$p" 2>/dev/null || true; done
    if [ -n "${KEEP_WORK:-}" ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

SCHEMA="bench_cluster_$$_$(date +%s)"
psql -q "$BASE" -c "CREATE SCHEMA $SCHEMA"
SEP='?'; case "$BASE" in *\?*) SEP='&';; esac
export TMS_DATABASE_URL="$BASE${SEP}options=-c%20search_path%3D$SCHEMA"
export TMS_CA_KEY_PASSPHRASE=bench-cluster-passphrase
export TMS_MQTT_LISTEN=127.0.0.1:0 TMS_HTTP_LISTEN=127.0.0.1:0 TMS_MQTT_HOSTNAMES=localhost,127.0.0.1
export TMS_MQTT_MAX_CONNECTIONS=20000 TMS_NODE_HEARTBEAT_SECS=${HEARTBEAT:-2} TMS_NODE_DEAD_AFTER_SECS=${DEAD_AFTER:-6}
export RUST_LOG=warn
sql() { psql -qtA "$BASE" -c "SET search_path TO $SCHEMA; $1" | tail -n 1; }
now() { date +%s.%N; }
port_of() { python3 -c "import json;print(json.load(open('$1/ports.json'))['$2'].rsplit(':',1)[1])"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
pg_ticks() { local t=0; for p in $(pgrep -x postgres); do t=$((t + $(ticks "$p" 2>/dev/null || echo 0))); done; echo "$t"; }
HZ=$(getconf CLK_TCK)

PORTS=()
HTTP_PORTS=()
for n in 1 2 3; do
    mkdir -p "$WORK/n$n"
    TMS_DATA_DIR=$WORK/n$n TMS_NODE_ID=n$n "$BIN" serve 2>"$WORK/n$n.log" &
    PIDS+=($!)
done
for n in 1 2 3; do
    for _ in $(seq 300); do [ -f "$WORK/n$n/ports.json" ] && break; sleep 0.1; done
    PORTS+=("$(port_of "$WORK/n$n" mqtt)")
    HTTP_PORTS+=("$(port_of "$WORK/n$n" http)")
done
LB=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
# Two descriptors per proxied connection, within this shell's limit.
MAXCONN=$(( ($(ulimit -n) - 200) / 2 ))
cat >"$WORK/haproxy.cfg" <<CFG
global
  maxconn $MAXCONN
defaults
  mode tcp
  timeout connect 1s
  timeout client 120s
  timeout server 120s
  retries 3
  option redispatch 1
frontend mqtt
  bind 127.0.0.1:$LB
  default_backend nodes
backend nodes
  balance roundrobin
  # As deploy/haproxy.cfg: each node checked on its /readyz, so a dead node gets no devices.
  option httpchk GET /readyz
  server n1 127.0.0.1:${PORTS[0]} check port ${HTTP_PORTS[0]} inter 500ms fall 2 rise 1
  server n2 127.0.0.1:${PORTS[1]} check port ${HTTP_PORTS[1]} inter 500ms fall 2 rise 1
  server n3 127.0.0.1:${PORTS[2]} check port ${HTTP_PORTS[2]} inter 500ms fall 2 rise 1
CFG
haproxy -db -f "$WORK/haproxy.cfg" 2>"$WORK/haproxy.log" &
LB_PID=$!
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$LB") 2>/dev/null && break; sleep 0.1; done
kill -0 "$LB_PID" || { cat "$WORK/haproxy.log" >&2; exit 1; }

# simulate registers SIM* devices and issues their certificates through node 1 first.
TMS_DATA_DIR=$WORK/n1 TMS_NODE_ID=n1 RUST_LOG=${SIM_LOG:-warn} "$BIN" simulate --devices "$N" --interval "$INTERVAL" \
    --mqtt "127.0.0.1:$LB" >"$WORK/sim.out" 2>"$WORK/sim.log" &
SIM_PID=$!
until [ "$(sql "SELECT COUNT(*) FROM device_status WHERE state = 'online'")" -gt 0 ]; do sleep 0.05; done
T0=$(now)
until [ "$(sql "SELECT COUNT(*) FROM device_status WHERE state = 'online'")" -ge "$N" ]; do sleep 0.1; done
T1=$(now)
echo "connect: $N devices online through the balancer in $(python3 -c "print(f'{$T1-$T0:.2f}')") s ($(python3 -c "print(f'{$N/($T1-$T0):.0f}')") connects/s)"
psql -qtA "$BASE" -c "SET search_path TO $SCHEMA; SELECT node_id || ' ' || COUNT(*) FROM device_status WHERE state = 'online' GROUP BY node_id ORDER BY node_id" | sed 's/^/  devices on /'

WINDOW=10
R0=$(sql "SELECT COUNT(*) FROM telemetry")
C0=(); for p in "${PIDS[@]}"; do C0+=("$(ticks "$p")"); done
P0=$(pg_ticks)
sleep "$WINDOW"
R1=$(sql "SELECT COUNT(*) FROM telemetry")
MSGS=$((R1 - R0))
echo "ingest: $((MSGS / WINDOW)) telemetry rows/s into PostgreSQL over ${WINDOW} s"
for i in 0 1 2; do
    d=$(( $(ticks "${PIDS[$i]}") - ${C0[$i]} ))
    echo "  n$((i + 1)) CPU $(python3 -c "print(f'{$d/$HZ/$WINDOW*100:.0f}% of a core')")"
done
PD=$(( $(pg_ticks) - P0 ))
echo "  PostgreSQL CPU $(python3 -c "print(f'{$PD/$HZ/$WINDOW*100:.0f}% of a core, {($PD/$HZ*1000)/max($MSGS,1):.3f} ms per message')")"
TOTAL=0; for i in 0 1 2; do TOTAL=$((TOTAL + $(ticks "${PIDS[$i]}") - ${C0[$i]})); done
echo "  gateway CPU per message (3 nodes together): $(python3 -c "print(f'{($TOTAL/$HZ*1000)/max($MSGS,1):.3f} ms')")"

VICTIM=$(sql "SELECT node_id FROM device_status WHERE state = 'online' GROUP BY node_id ORDER BY COUNT(*) DESC LIMIT 1")
HELD=$(sql "SELECT COUNT(*) FROM device_status WHERE state = 'online' AND node_id = '$VICTIM'")
K=${VICTIM#n}
kill -9 "${PIDS[$((K - 1))]}"
TK=$(now)
# Both watched at once: the devices may be back on other nodes before the victim is declared
# lost (a takeover of a session on a dead node), or after.
TL=""; TB=""
while [ -z "$TL" ] || [ -z "$TB" ]; do
    if [ -z "$TL" ] && [ "$(sql "SELECT COUNT(*) FROM device_sessions WHERE node_id = '$VICTIM' AND ended_at IS NULL")" -eq 0 ]; then TL=$(now); fi
    if [ -z "$TB" ] && [ "$(sql "SELECT COUNT(*) FROM device_status WHERE state = 'online' AND node_id <> '$VICTIM'")" -ge "$N" ]; then TB=$(now); fi
    sleep 0.1
done
echo "kill -9 $VICTIM (held $HELD devices, heartbeat ${TMS_NODE_HEARTBEAT_SECS} s, dead after ${TMS_NODE_DEAD_AFTER_SECS} s):"
echo "  its sessions all ended after $(python3 -c "print(f'{$TL-$TK:.2f}')") s; all $N devices online on the other nodes after $(python3 -c "print(f'{$TB-$TK:.2f}')") s"
echo "  ended node_lost: $(sql "SELECT COUNT(*) FROM device_sessions WHERE node_id = '$VICTIM' AND end_reason = 'node_lost'")"
psql -q "$BASE" -c "DROP SCHEMA $SCHEMA CASCADE" >/dev/null 2>&1
