#!/usr/bin/env bash
# Builds the guests here into one component, OUTDIR/guests.wasm, for the jobhook:handler/core
# world: guests.js imports every other module and runs the one its handler property `guest`
# names (healthy, loop, ...). One component instead of one per guest: QuickJS is built and
# compiled once.
#   tests/guests-js/build.sh OUTDIR
# Toolchain: scripts/lang-toolchains.sh js. Prints the component's size and build time.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(realpath -m "$1")
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$root/target/lang-toolchains}
qjs=$toolchains/npm/node_modules/.bin/componentize-qjs
[ -x "$qjs" ] || { echo "componentize-qjs is missing: run scripts/lang-toolchains.sh js" >&2; exit 1; }
mkdir -p "$out"
start=$(date +%s.%N)
# --module-root lets guests.js import the other modules while the component is built.
"$qjs" --sync --wit "$root/wit" --world core --js "$here/guests.js" --module-root "$here" \
    -o "$out/guests.wasm" >/dev/null
printf '%-10s %9d bytes  %.1f s\n' guests "$(stat -c %s "$out/guests.wasm")" \
    "$(awk "BEGIN { print $(date +%s.%N) - $start }")"
