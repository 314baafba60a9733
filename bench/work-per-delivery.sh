#!/bin/sh
# The runs of docs/PERFORMANCE.md, "Work per delivery": closed loop (wrk, 32 connections,
# 20 s) and open loop (2,000 events/s, 20 s), plain and governed endpoint, auditing on,
# PostgreSQL (a fresh database per run) and SQLite, each twice, in alternation.
#
#   bench/work-per-delivery.sh [BINARY] [POSTGRES_SERVER_URL] [OUTPUT_DIR]
#
# BINARY defaults to ./target/release/hookwarden (cargo build --release); the PostgreSQL
# server to postgres://postgres@127.0.0.1:5432/postgres (only used to create and drop
# hw_bench_<ulid> databases); OUTPUT_DIR to target/work-per-delivery/<time>. Needs wrk
# (Debian: apt-get install wrk). Each run's output goes to its own file (a failed run's
# ends in its exit status); a line per run on standard output says which.
# DATABASES="postgres" (or "sqlite") runs only those; ROUNDS (default 2) sets the repeats.
set -eu

binary=${1:-./target/release/hookwarden}
server=${2:-postgres://postgres@127.0.0.1:5432/postgres}
out=${3:-target/work-per-delivery/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"

for round in $(seq "${ROUNDS:-2}"); do
  for database in ${DATABASES:-postgres sqlite}; do
    for endpoint in plain governed; do
      for loop in closed open; do
        set -- bench deliver --seconds 20 --audit-outcomes all
        case $loop in
          closed) set -- "$@" --closed-loop-wrk --connections 32 ;;
          open) set -- "$@" --rate 2000 ;;
        esac
        [ "$endpoint" = governed ] && set -- "$@" --governed
        [ "$database" = postgres ] && set -- "$@" --database-url "$server" --fresh-database
        file="$out/$database-$endpoint-$loop-$round.txt"
        echo "$binary $* > $file"
        echo "$binary $*" > "$file"
        "$binary" "$@" >> "$file" 2>&1 || echo "exit status $?" >> "$file"
      done
    done
  done
done
