#!/usr/bin/env bash
# Ingest into PostgreSQL against ingest into SQLite (issue #17): P publishers (default 50),
# each its own device with its own certificate, each sending M QoS 1 telemetry messages
# (default 2,000) as fast as `mosquitto_pub -l` goes, all at once — first to a gateway on
# SQLite, then to a gateway on PostgreSQL (a fresh schema in TMS_BENCH_DATABASE_URL), one
# after the other, same client, same run. The PUBACK leaves once the message is committed
# on both.
# Figures: messages per second, messages stored of those sent, and CPU per message — the
# gateway's on SQLite; the gateway's plus PostgreSQL's own (every postgres process on the
# machine) on PostgreSQL — with their ratio. Appends to bench/results/pgflood.jsonl.
#
# Usage: bench/pgflood.sh [PUBLISHERS] [MESSAGES_EACH]
# Env:   TMS_BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test)
set -euo pipefail
cd "$(dirname "$0")/.."
P=${1:-50}
M=${2:-2000}
BASE=${TMS_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
command -v psql >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql-client >/dev/null; }
source bench/lib.sh

SCHEMA="bench_pgflood_$$_$(date +%s)"
psql -q "$BASE" -c "CREATE SCHEMA $SCHEMA"
SEP='?'; case "$BASE" in *\?*) SEP='&';; esac
PG_URL="$BASE${SEP}options=-c%20search_path%3D$SCHEMA"
trap 'kill $GW_PID 2>/dev/null || true; psql -q "$BASE" -c "DROP SCHEMA $SCHEMA CASCADE" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
pg_ticks() { local t=0 p; for p in $(pgrep -x postgres); do t=$((t + $(cpu "$p" 2>/dev/null || echo 0))); done; echo "$t"; }
telemetry_lines "$M" >"$WORK/payload.txt"

# Registers the publishers in the store the environment names and issues their certificates
# into $1.
provision() {
    local i
    for i in $(seq -f "%02g" 1 "$P"); do
        "$BIN" device add --serial "PGF00$i" --mac "02:50:47:00:00:$(printf %02X "$((10#$i))")" --company PgFlood >/dev/null
        "$BIN" device cert "PGF00$i" --out "$1/PGF00$i" >/dev/null
    done
}

# Floods the running gateway with certificates from $1; prints
# "<gateway CPU µs/msg> <postgres CPU µs/msg> <seconds> <publisher failures>".
flood() {
    local dev=$1 c0 p0 t0 t1 c1 p1 fails=0 pids=() d s
    c0=$(cpu "$GW_PID"); p0=$(pg_ticks); t0=$(date +%s.%N)
    for d in "$dev"/PGF*; do
        s=$(basename "$d")
        mosquitto_pub -h localhost -p "$GW_PORT" --cafile "$d/ca.pem" --cert "$d/$s.pem" --key "$d/$s.key" \
            -i "$s" -t "tms/$s/telemetry" -q 1 -l <"$WORK/payload.txt" 2>>"$WORK/pub.err" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
    t1=$(date +%s.%N)
    c1=$(settle "$GW_PID"); p1=$(pg_ticks)
    python3 -c "n=$P*$M;print(f'{(($c1-$c0)/$HZ)/n*1e6:.2f} {(($p1-$p0)/$HZ)/n*1e6:.2f} {$t1-$t0:.2f} $fails')"
}

# Rows per ingest commit so far, from the running gateway's /metrics.
rows_per_commit() {
    curl -sf "http://$GW_HTTP/metrics" | python3 -c "
import sys
m = {l.split()[0]: float(l.split()[1]) for l in sys.stdin if l.startswith('tms_ingest_batch_rows_')}
print(f\"{m.get('tms_ingest_batch_rows_sum', 0) / max(m.get('tms_ingest_batch_rows_count', 1), 1):.1f}\")" || echo 0
}

stop_gateway() { kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true; GW_PID=""; }

echo "SQLite: registering $P devices" >&2
provision "$WORK/dev-sqlite"
start_gateway
echo "SQLite: $P × $M QoS 1" >&2
read -r s_us _ s_s s_fail < <(flood "$WORK/dev-sqlite")
S_BATCH=$(rows_per_commit)
S_STORED=$(python3 -c "import sqlite3;print(sqlite3.connect('$TMS_DATA_DIR/tms.db').execute(\"select count(*) from telemetry where serial like 'PGF%'\").fetchone()[0])")
stop_gateway
echo "SQLite: $s_us µs gateway CPU/msg, $s_s s, stored $S_STORED of $((P * M)), $S_BATCH rows per commit" >&2

export TMS_DATA_DIR=$WORK/gw-pg TMS_DATABASE_URL=$PG_URL TMS_CA_KEY_PASSPHRASE=bench-pgflood-passphrase
mkdir -p "$TMS_DATA_DIR"
"$BIN" init >/dev/null
echo "PostgreSQL: registering $P devices" >&2
provision "$WORK/dev-pg"
start_gateway
echo "PostgreSQL: $P × $M QoS 1" >&2
read -r g_us pg_us p_s p_fail < <(flood "$WORK/dev-pg")
P_BATCH=$(rows_per_commit)
P_STORED=$(psql -qtA "$BASE" -c "SELECT count(*) FROM $SCHEMA.telemetry WHERE serial LIKE 'PGF%'")
stop_gateway
echo "PostgreSQL: $g_us µs gateway + $pg_us µs PostgreSQL CPU/msg, $p_s s, stored $P_STORED of $((P * M)), $P_BATCH rows per commit" >&2

python3 - "$P" "$M" "$S_STORED" "$s_us" "$s_s" "$s_fail" "$P_STORED" "$g_us" "$pg_us" "$p_s" "$p_fail" "$S_BATCH" "$P_BATCH" <<'PY'
import json, sys, datetime, platform, os
p, m = int(sys.argv[1]), int(sys.argv[2])
s_stored, s_us, s_s, s_fail = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
p_stored, g_us, pg_us, p_s, p_fail = int(sys.argv[7]), float(sys.argv[8]), float(sys.argv[9]), float(sys.argv[10]), int(sys.argv[11])
sent = p * m
s_batch, p_batch = float(sys.argv[12]), float(sys.argv[13])
rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": f"{platform.machine()} {os.cpu_count()} cores",
       "publishers": p, "messages_each": m, "sent": sent,
       "sqlite": {"stored": s_stored, "msgs_per_s": round(sent / s_s), "gateway_cpu_us_per_msg": s_us, "rows_per_commit": s_batch,
                  "publisher_failures": s_fail},
       "postgres": {"stored": p_stored, "msgs_per_s": round(sent / p_s), "gateway_cpu_us_per_msg": g_us,
                    "postgres_cpu_us_per_msg": pg_us, "rows_per_commit": p_batch, "total_cpu_us_per_msg": round(g_us + pg_us, 2),
                    "publisher_failures": p_fail},
       "ratio_postgres_total_over_sqlite": round((g_us + pg_us) / s_us, 2) if s_us > 0 else None}
open("bench/results/pgflood.jsonl", "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec, indent=2))
PY
