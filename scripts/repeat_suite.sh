#!/usr/bin/env bash
# The test suite N times (default 20), J copies at a time (default 2), so that every run meets
# the load of the others, as CI meets a busy machine. Every run counts: one line each, and the
# exit code is 1 if any failed.
#   bash scripts/repeat_suite.sh [N] [J]
set -uo pipefail
n=${1:-20}
j=${2:-2}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
run() {  # run I: its own temporary folder, log and result line
  local start=$SECONDS result=passed
  python -m pytest -q -p no:cacheprovider --basetemp="$work/t$1" > "$work/run-$1.log" 2>&1 || result=FAILED
  echo "run $1: $result in $((SECONDS - start)) s: $(tail -n 1 "$work/run-$1.log")" | tee -a "$work/results"
}
for i in $(seq 1 "$n"); do
  run "$i" &
  while [ "$(jobs -rp | wc -l)" -ge "$j" ]; do wait -n; done
done
wait
failed=$(grep -c FAILED "$work/results")
echo "$n runs, $j at a time, $failed failed (logs: $work)"
[ "$failed" -eq 0 ]
