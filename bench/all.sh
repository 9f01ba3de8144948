#!/usr/bin/env bash
# The whole benchmark, unattended (8 min 42 s on the 2-core machine on 2026-12-03, the
# build of the criterion benches included): each harness starts and stops its own gateway
# and Mosquitto, then the criterion micro-benchmarks. Every figure is appended to
# bench/results/*.jsonl; BENCHMARKS.md says which targets are met.
#
# Usage: bench/all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
# One release build for every harness (each would otherwise check it again); BIN= given
# runs that binary instead.
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked -p tms-gateway >&2
    export BIN=$PWD/target/release/tms-gateway
fi
step() { echo; echo "=== $* ($(($(date +%s) - started)) s)" >&2; }

step "CPU per connect and per message: bench/run.sh 300 50000"
bench/run.sh 300 50000
step "connect cost, 400 certificates, 8 concurrent clients: bench/connect.sh 400 8"
bench/connect.sh 400 8
step "memory per idle connection: bench/idle.sh 5000"
bench/idle.sh 5000
step "QoS 1 flood, 50 publishers: bench/flood.sh 50 2000"
bench/flood.sh 50 2000
step "ingest into PostgreSQL against SQLite, 50 publishers: bench/pgflood.sh 50 2000"
bench/pgflood.sh 50 2000
step "latency at 1k and 5k msg/s: bench/latency.sh 10"
bench/latency.sh 10
step "reconnect storm, 10,000 devices at once: bench/storm.sh 10000"
bench/storm.sh 10000
step "micro-benchmarks: cargo bench"
cargo bench --locked -p tms-certs -p tms-broker -p tms-ingest -p tms-store --bench issue --bench connect --bench parse --bench commit -- --warm-up-time 1 --measurement-time 3 2>&1 \
    | awk '/change:/ {skip = 2; next} skip > 0 {skip--; next} /^[a-z_]+\/|time:|thrpt:/' | tee "bench/results/criterion-$(date -u +%Y-%m-%d).txt"
step "done"
