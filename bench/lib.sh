# Shared by the bench scripts (sourced, not run).

# run_recorded FILE BINARY ARG...: runs BINARY with ARGs, its command line and all it
# prints in FILE (a failed run's ends in its exit status); a line on standard output says
# which.
run_recorded() {
  file=$1
  binary=$2
  shift 2
  echo "$binary $* > $file"
  echo "$binary $*" > "$file"
  "$binary" "$@" >> "$file" 2>&1 || echo "exit status $?" >> "$file"
}

# in_turn ROUND BINARY...: the binaries in the order of round ROUND, reversed every other
# round, so that neither always runs first.
in_turn() {
  round=$1
  shift
  if [ $((round % 2)) -eq 0 ]; then
    echo "$*" | tr ' ' '\n' | tac | tr '\n' ' '
  else
    echo "$*"
  fi
}

# label BINARY: a file-name-safe name for BINARY, from its directory and name.
label() {
  echo "$(basename "$(dirname "$1")")-$(basename "$1")"
}
