#!/bin/sh
# The runs of docs/PERFORMANCE.md, "Work per delivery": closed loop (wrk, 32 connections,
# 20 s) and open loop (2,000 events/s, 20 s), plain and governed endpoint, auditing on,
# PostgreSQL (a fresh database per run) and SQLite, for each binary given, the binaries
# alternating and their order reversed every other round.
#
#   bench/work-per-delivery.sh OUTPUT_DIR BINARY [BINARY ...]
#
# POSTGRES (default postgres://postgres@127.0.0.1:5432/postgres) is only used to create and
# drop hw_bench_<ulid> databases. Needs wrk (Debian: apt-get install wrk). DATABASES
# (default "postgres sqlite"), ENDPOINTS (default "plain governed"), LOOPS (default
# "closed open") and ROUNDS (default 2) narrow or widen the runs. Each run's output goes to
# its own file; a line per run on standard output says which.
set -eu
. "$(dirname "$0")/lib.sh"

out=$1
shift
all=$*
mkdir -p "$out"
server=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}

for round in $(seq "${ROUNDS:-2}"); do
  for database in ${DATABASES:-postgres sqlite}; do
    for loop in ${LOOPS:-closed open}; do
      for endpoint in ${ENDPOINTS:-plain governed}; do
        for binary in $(in_turn "$round" $all); do
          set -- bench deliver --seconds 20 --audit-outcomes all
          case $loop in
            closed) set -- "$@" --closed-loop-wrk --connections 32 ;;
            open) set -- "$@" --rate 2000 ;;
          esac
          [ "$endpoint" = governed ] && set -- "$@" --governed
          [ "$database" = postgres ] && set -- "$@" --database-url "$server" --fresh-database
          run_recorded "$out/$(label "$binary")-$database-$endpoint-$loop-$round.txt" "$binary" "$@"
        done
      done
    done
  done
done
