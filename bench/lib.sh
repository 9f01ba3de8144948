# Shared by the bench/ scripts (sourced): a release gateway and a Mosquitto with the
# equivalent mutual-TLS configuration, both on free ports in one temporary directory, and
# readers of a process's CPU time and resident memory.

command -v mosquitto >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; }
command -v mosquitto_pub >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto-clients >/dev/null; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # one socket per device on each side

# BIN=/path/to/tms-gateway runs a binary built earlier (e.g. a copy, so that a build under
# way cannot change it mid-run) instead of building the release one.
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked -p tms-gateway >&2
    BIN=$PWD/target/release/tms-gateway
fi
WORK=$(mktemp -d)
GW_PID="" MQ_PID="" AT_EXIT=""
# A script that changes the machine (a sysctl) appends its undo step to AT_EXIT ("cmd; ").
trap 'eval "$AT_EXIT"; kill $GW_PID $MQ_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT

export TMS_DATA_DIR=$WORK/gw TMS_MQTT_LISTEN=127.0.0.1:0 TMS_HTTP_LISTEN=127.0.0.1:0 TMS_MQTT_HOSTNAMES=localhost
export TMS_MQTT_MAX_CONNECTIONS=20000 RUST_LOG=warn
"$BIN" init >/dev/null   # the scripts provision devices before the first start

free_port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }

# Starts the gateway; sets GW_PID, GW_PORT (MQTT) and GW_HTTP (host:port).
start_gateway() {
    "$BIN" serve 2>"$WORK/gw.log" &
    GW_PID=$!
    for _ in $(seq 100); do [ -f "$TMS_DATA_DIR/ports.json" ] && break; sleep 0.1; done
    GW_PORT=$(python3 -c "import json;print(json.load(open('$TMS_DATA_DIR/ports.json'))['mqtt'].rsplit(':',1)[1])")
    GW_HTTP=$(python3 -c "import json;print(json.load(open('$TMS_DATA_DIR/ports.json'))['http'])")
}

# Mosquitto with the gateway's CA and server certificate, as close to the gateway's settings
# as it gets: client certificate required, identity as user name, TCP_NODELAY, no
# persistence, large queues. Needs start_gateway first (for the certificates); sets MQ_PID
# and MQ_PORT.
start_mosquitto() {
    MQ_PORT=$(free_port)
    cat > "$WORK/mosquitto.conf" <<CONF
user root
per_listener_settings false
persistence false
max_queued_messages 1000000
max_inflight_messages 100
max_connections -1
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
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$MQ_PORT") 2>/dev/null && break; sleep 0.1; done
}

HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }                  # utime + stime, clock ticks
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# Waits until process $1's CPU time has stopped moving for half a second (its work is done).
settle() {
    local prev=-1 now
    now=$(cpu "$1")
    while [ "$now" != "$prev" ]; do prev=$now; sleep 0.5; now=$(cpu "$1"); done
    echo "$now"
}

mosquitto_version() { mosquitto -h | head -n1; }

# N realistic telemetry messages (CONTRACT §4), one per line, for `mosquitto_pub -l`.
telemetry_lines() {
    python3 - "$1" <<'PY'
import sys
for n in range(int(sys.argv[1])):
    print('{"mode":"online","load_pct":%d,"battery":{"charge_pct":100,"runtime_min":40},"input":{"voltage":229.8,"frequency_hz":50}}' % (n % 100))
PY
}
