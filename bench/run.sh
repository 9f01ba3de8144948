#!/usr/bin/env bash
# Side-by-side benchmark: tms-gateway (release build, SQLite ingest on) against a Mosquitto
# started here with the equivalent mutual-TLS configuration, driven by the same third-party
# client (mosquitto_pub from Debian's mosquitto-clients), in the same run.
#
# The load generator shares the 2-core box with the broker, so the figure that compares is
# the broker process's own CPU time per operation (utime + stime from /proc/<pid>/stat),
# reported as a ratio gateway / Mosquitto. Results are appended to bench/results/*.jsonl.
#
# The connect figure is also set against the crypto floor of one server-side mutual-TLS
# TLS 1.3 handshake, measured in the same run with `openssl speed` (OpenSSL's arithmetic,
# which Mosquitto uses; the gateway's ring has its own, so connect_over_crypto_floor also
# carries that difference). All keys are ECDSA P-256 (the CA, the server certificate and the
# devices' certificates: rcgen's KeyPair::generate default) and both brokers agree on X25519:
#   one X25519 exchange, one ECDSA P-256 sign (the server's CertificateVerify) and two ECDSA
#   P-256 verifies (the client certificate's signature by the CA, the client's
#   CertificateVerify); floor µs = sum of 1e6 / (ops per s) over these four.
# The server does an X25519 keygen and a derive; the floor counts the derive only, the one
# operation `openssl speed ecdhx25519` times (its keys are made before the timing loop). The
# keygen is a fixed-base multiplication, cheaper than a derive, with no `openssl speed` figure
# of its own; counting it as a second derive would overstate what is meant as a lower bound.
# Symmetric work (HKDF, AEAD, hashing) and certificate parsing are left out too.
#
# Usage: bench/run.sh [CONNECTS] [MESSAGES]      (defaults 400 and 50000)
# Keep MESSAGES below 65535: Debian's mosquitto_pub 2.0.11 in -l mode with QoS 1 stops
# sending after its message ids wrap (seen against Mosquitto itself too).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTS=${1:-400}
MESSAGES=${2:-50000}

source bench/lib.sh
"$BIN" device add --serial BENCH0001 --mac 02:42:00:00:00:01 --company Bench >/dev/null
"$BIN" device cert BENCH0001 --out "$WORK/dev" >/dev/null
start_gateway
start_mosquitto

TLS=(--cafile "$WORK/dev/ca.pem" --cert "$WORK/dev/BENCH0001.pem" --key "$WORK/dev/BENCH0001.key" -i BENCH0001)

connects() { # port
    for _ in $(seq "$CONNECTS"); do
        mosquitto_pub -h localhost -p "$1" "${TLS[@]}" -t tms/BENCH0001/status -m online -q 0
    done
}
messages() { # port qos
    telemetry_lines "$MESSAGES" | mosquitto_pub -h localhost -p "$1" "${TLS[@]}" -t tms/BENCH0001/telemetry -q "$2" -l
}
measure() { # name pid count command...
    local name=$1 pid=$2 count=$3; shift 3
    local c0 t0 c1 t1
    c0=$(cpu "$pid"); t0=$(date +%s.%N)
    "$@"
    # Count the broker's work until it is done with what the client handed over (the
    # gateway's ingest commits).
    c1=$(settle "$pid"); t1=$(date +%s.%N)
    python3 -c "print(f'{(($c1-$c0)/$HZ)/$count*1e6:.2f} {$t1-$t0:.2f}')"
}

echo "warming up" >&2
connects "$GW_PORT" >/dev/null 2>&1 || true
CONNECTS_SAVED=$CONNECTS; CONNECTS=20; connects "$MQ_PORT"; CONNECTS=$CONNECTS_SAVED

# Each figure three times, the brokers taking turns, and the median kept: a single run on this
# shared machine moves by ±20 %.
export REPEAT=${REPEAT:-3}
results=()
for figure in connect qos0 qos1; do
    declare -A runs=([gateway]="" [mosquitto]="")
    for _ in $(seq "$REPEAT"); do
        for broker in gateway mosquitto; do
            if [ $broker = gateway ]; then pid=$GW_PID; port=$GW_PORT; else pid=$MQ_PID; port=$MQ_PORT; fi
            case $figure in
                connect) r=$(measure $figure $pid "$CONNECTS" connects "$port") ;;
                qos0) r=$(measure $figure $pid "$MESSAGES" messages "$port" 0) ;;
                qos1) r=$(measure $figure $pid "$MESSAGES" messages "$port" 1) ;;
            esac
            echo "$figure $broker: ${r% *} µs CPU per op (wall ${r#* } s)" >&2
            runs[$broker]+="${r% *} "
        done
    done
    for broker in gateway mosquitto; do
        median=$(python3 -c "import sys,statistics;print(statistics.median(map(float,sys.argv[1:])))" ${runs[$broker]})
        echo "$figure $broker: median $median µs" >&2
        results+=("$figure $broker $median")
    done
done

# The crypto floor, measured after the brokers' figures so that neither broker is busy.
X25519_OPS=$(openssl speed -mr -seconds 2 ecdhx25519 2>/dev/null | awk -F: '/^\+F5:/ {print $4}')
read -r SIGN_OPS VERIFY_OPS < <(openssl speed -mr -seconds 2 ecdsap256 2>/dev/null | awk -F: '/^\+F4:/ {print $4, $5}')
[ -n "$X25519_OPS" ] && [ -n "$VERIFY_OPS" ] || { echo "openssl speed gave no figure" >&2; exit 1; }
echo "openssl speed: X25519 $X25519_OPS derives/s, P-256 $SIGN_OPS signs/s, $VERIFY_OPS verifies/s" >&2

# Rows per ingest commit: with a durable PUBACK the commit is what a QoS 1 message waits for,
# and how many messages share one decides the CPU per message.
BATCH=$(curl -sf "http://$GW_HTTP/metrics" | python3 -c "
import sys
m = {l.split()[0]: float(l.split()[1]) for l in sys.stdin if l.startswith('tms_ingest_batch_rows_')}
print(f\"{m.get('tms_ingest_batch_rows_sum', 0) / max(m.get('tms_ingest_batch_rows_count', 1), 1):.1f}\")" || echo "?")
echo "rows per ingest commit (whole run): $BATCH" >&2

STORED=$(python3 - <<PY
import sqlite3
print(sqlite3.connect("$TMS_DATA_DIR/tms.db").execute("select count(*) from telemetry where serial='BENCH0001'").fetchone()[0])
PY
)
OUT=bench/results/$(date -u +%Y-%m-%d).jsonl
python3 - "$OUT" "$CONNECTS" "$MESSAGES" "$STORED" "$(mosquitto_version)" "$X25519_OPS" "$SIGN_OPS" "$VERIFY_OPS" "${results[@]}" <<'PY'
import json, sys, platform, subprocess, datetime
out, connects, messages, stored, mosq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
x25519, sign, verify = map(float, sys.argv[6:9])
floor_us = 1e6 / x25519 + 1e6 / sign + 2 * 1e6 / verify
r = {}
for line in sys.argv[9:]:
    fig, broker, v = line.split()
    r.setdefault(fig, {})[broker] = float(v)
rec = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": f"{platform.machine()} {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
    "mosquitto": mosq,
    "connects": connects, "messages": messages,
    "telemetry_rows_sent": 2 * int(__import__("os").environ.get("REPEAT", "3")) * messages,
    "telemetry_rows_stored": stored,
    "cpu_us_per_op": r,
    "ratio_gateway_over_mosquitto": {k: round(v["gateway"] / v["mosquitto"], 2) for k, v in r.items()},
    "crypto_ops_per_s": {"x25519_derive": x25519, "ecdsap256_sign": sign, "ecdsap256_verify": verify},
    "crypto_floor_us": round(floor_us, 1),
    "connect_over_crypto_floor": round(r["connect"]["gateway"] / floor_us, 2),
}
print(f"crypto floor of one server-side handshake: {floor_us:.1f} µs; connect CPU / floor: "
      f"gateway {r['connect']['gateway'] / floor_us:.2f}, mosquitto {r['connect']['mosquitto'] / floor_us:.2f}",
      file=sys.stderr)
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
