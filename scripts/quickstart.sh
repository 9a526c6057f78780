#!/usr/bin/env bash
# The README's first command: build TinyScheduler, apply the example manifests into a fresh state
# directory, run the scheduler until every example task is done, and show the result.
# Local tasks only: no tinytask server is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Always this directory, which the script empties first: never TINYSCHEDULER_STATE_DIR, which
# may name a real state directory.
state=./state/quickstart
cargo build --quiet --bin tinyscheduler
# Where cargo put it: ./target unless CARGO_TARGET_DIR says otherwise.
bin="${CARGO_TARGET_DIR:-./target}/debug/tinyscheduler"
ts() { "$bin" --state-dir "$state" "$@"; }

rm -rf "$state"
echo "== apply -f manifests/"
ts apply -f manifests/
echo
echo "== run --once --wait   (assigns, starts agents, waits for them; progress below)"
ts run --once --wait
echo
echo "== get tasks"
ts get tasks
echo
echo "== get agents"
ts get agents
echo
echo "== logs add-tests      (it waited for fix-login, its blocker)"
ts logs add-tests
echo
echo "State is in $state: try  $bin --state-dir $state describe task add-tests"
