#!/usr/bin/env bash
# The test suite N times in a row (default 20) while a second copy of it runs beside as load, the
# way CI meets a busy machine. One line per run; exits 1 if any measured run failed.
#   bash scripts/repeat_suite.sh [N]
set -uo pipefail
n=${1:-20}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
setsid bash -c "while true; do python -m pytest -q -p no:cacheprovider --basetemp='$work/load' > '$work/load.log' 2>&1; done" &
load=$!  # its own process group: the trap ends it and the suite it is running
trap 'kill -- -$load 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$n"); do
  start=$SECONDS
  if python -m pytest -q -p no:cacheprovider --basetemp="$work/run" > "$work/run-$i.log" 2>&1; then
    result=passed
  else
    result=FAILED
    failed=$((failed + 1))
  fi
  echo "run $i: $result in $((SECONDS - start)) s: $(tail -n 1 "$work/run-$i.log")"
done
echo "$n runs under load, $failed failed (logs: $work)"
[ "$failed" -eq 0 ]
