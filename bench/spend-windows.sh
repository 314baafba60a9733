#!/bin/sh
# The runs of docs/PERFORMANCE.md, "Spend windows in O(1)": a governed allow with a spend
# clause (`hookwarden bench policy --ledger-entries N`) with an empty 24 h window and with
# one already holding 1,000,000 entries, on PostgreSQL (a fresh database per run) and
# SQLite, for each binary given, the binaries alternating and their order reversed every
# other round.
#
#   bench/spend-windows.sh OUTPUT_DIR BINARY [BINARY ...]
#
# POSTGRES (default postgres://postgres@127.0.0.1:5432/postgres) is only used to create and
# drop hw_bench_<ulid> databases. ENTRIES (default "0 1000000"), DECISIONS (default 500),
# DATABASES (default "postgres sqlite") and ROUNDS (default 2) narrow or widen the runs.
# Each run's output goes to its own file; a line per run on standard output says which.
set -eu
. "$(dirname "$0")/lib.sh"

out=$1
shift
all=$*
mkdir -p "$out"
server=${POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}

for round in $(seq "${ROUNDS:-2}"); do
  for database in ${DATABASES:-postgres sqlite}; do
    for entries in ${ENTRIES:-0 1000000}; do
      for binary in $(in_turn "$round" $all); do
        set -- bench policy --ledger-entries "$entries" --decisions "${DECISIONS:-500}"
        [ "$database" = postgres ] && set -- "$@" --database-url "$server"
        run_recorded "$out/$(label "$binary")-$database-$entries-$round.txt" "$binary" "$@"
      done
    done
  done
done
