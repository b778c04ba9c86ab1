#!/usr/bin/env bash
# Builds the guests here into one component, OUTDIR/guests.wasm, for the jobhook:handler/core
# world: guests.py is the app and runs the module its handler property `guest` names (healthy,
# hostile_loop, ...). One component instead of one per guest: CPython is built and compiled once.
#   tests/guests-py/build.sh OUTDIR
# Toolchain: scripts/lang-toolchains.sh py. Prints the component's size and build time.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(realpath -m "$1")
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$root/target/lang-toolchains}
cpy=$toolchains/py/bin/componentize-py
[ -x "$cpy" ] || { echo "componentize-py is missing: run scripts/lang-toolchains.sh py" >&2; exit 1; }
mkdir -p "$out"
start=$(date +%s.%N)
# Only the guests' sources are bundled (a copy in a folder of its own, without this script).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp "$here"/*.py "$src/"
"$cpy" -d "$root/wit" -w core componentize -p "$src" guests -o "$out/guests.wasm" >/dev/null
printf '%-10s %9d bytes  %.1f s\n' guests "$(stat -c %s "$out/guests.wasm")" \
    "$(awk "BEGIN { print $(date +%s.%N) - $start }")"
