#!/bin/sh
# Checks the systemd files in deploy/ with systemd's own tools, failing on any error or warning:
#   - `systemd-analyze verify` on tinyscheduler.service, tinyscheduler-once.service and
#     tinyscheduler.timer;
#   - `systemd-sysusers --dry-run` on tinyscheduler.sysusers (parses it; creates nothing);
#   - every setting line in tinyscheduler.env.example is a commented KEY=VALUE.
#
# It installs nothing. Without systemd-analyze it says how to get it and exits 2 (on Debian and
# Ubuntu: `apt-get install systemd`; the tools ship with systemd itself).
#
# The units run /usr/local/bin/tinyscheduler, and `systemd-analyze verify` insists that an
# ExecStart= program exists. So the units are verified as copies in a temporary directory whose
# only change is that path, pointed at a built binary: $TINYSCHEDULER_BIN if set, else the first of
# /usr/local/bin/tinyscheduler, target/release/tinyscheduler, target/debug/tinyscheduler (relative
# to the repository). Build one first (`cargo build`).
#
# Usage: deploy/verify.sh        (from anywhere; exit 0 = all clean)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
units="tinyscheduler.service tinyscheduler-once.service tinyscheduler.timer"
installed=/usr/local/bin/tinyscheduler

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify.sh: systemd-analyze not found; cannot verify the units." >&2
    echo "verify.sh: install systemd's tools (Debian/Ubuntu: apt-get install systemd) and rerun." >&2
    exit 2
fi

bin=${TINYSCHEDULER_BIN:-}
if [ -z "$bin" ]; then
    target=${CARGO_TARGET_DIR:-$repo/target}
    for c in "$installed" "$target/release/tinyscheduler" "$target/debug/tinyscheduler"; do
        if [ -x "$c" ]; then
            bin=$c
            break
        fi
    done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "verify.sh: no tinyscheduler binary to point ExecStart= at; run \`cargo build\` or set TINYSCHEDULER_BIN." >&2
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
# A fixed, space-free path for the binary inside the temporary directory.
ln -s "$bin" "$tmp/tinyscheduler"
for u in $units; do
    sed "s#$installed#$tmp/tinyscheduler#g" "$here/$u" >"$tmp/$u"
done

status=0
echo "systemd-analyze verify $units (ExecStart -> $bin)"
# verify reports problems on stderr and may still exit 0 for warnings: any output is a failure.
out=$(cd "$tmp" && systemd-analyze verify $units 2>&1) || status=1
if [ -n "$out" ]; then
    printf '%s\n' "$out" | sed "s#$tmp/##g" >&2
    status=1
fi

# verify does not notice a timer whose Unit= names no unit we ship.
target=$(sed -n 's/^Unit=//p' "$here/tinyscheduler.timer")
if [ ! -f "$here/$target" ]; then
    echo "tinyscheduler.timer: Unit=$target is not a file in deploy/" >&2
    status=1
fi

if command -v systemd-sysusers >/dev/null 2>&1; then
    echo "systemd-sysusers --dry-run tinyscheduler.sysusers"
    # It prints what it would create; problems are reported as "<file>:<line>: …" or "Failed …".
    sysout=$(systemd-sysusers --dry-run "$here/tinyscheduler.sysusers" 2>&1) || status=1
    if printf '%s\n' "$sysout" | grep -Eq 'tinyscheduler\.sysusers:[0-9]+|Failed|[Ii]nvalid|[Ii]gnoring'; then
        printf '%s\n' "$sysout" >&2
        status=1
    fi
else
    echo "verify.sh: systemd-sysusers not found; skipping tinyscheduler.sysusers" >&2
fi

echo "tinyscheduler.env.example: every setting is a commented TINYSCHEDULER_*=VALUE line"
bad=$(grep -vnE '^(#.*)?$' "$here/tinyscheduler.env.example" || true)
if [ -n "$bad" ]; then
    echo "tinyscheduler.env.example: uncommented lines (the example must change nothing):" >&2
    printf '%s\n' "$bad" >&2
    status=1
fi
bad=$(grep -nE '^#TINYSCHEDULER_' "$here/tinyscheduler.env.example" | grep -vE '^[0-9]+:#TINYSCHEDULER_[A-Z0-9_]+=' || true)
if [ -n "$bad" ]; then
    echo "tinyscheduler.env.example: malformed settings:" >&2
    printf '%s\n' "$bad" >&2
    status=1
fi

if [ "$status" -eq 0 ]; then
    echo "deploy: all units verify cleanly"
else
    echo "deploy: verification FAILED" >&2
fi
exit "$status"
