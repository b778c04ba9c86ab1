#!/usr/bin/env bash
# Builds every guest here (NAME.js) into OUTDIR/NAME.wasm for the jobhook:handler/core world.
#   tests/guests-js/build.sh OUTDIR
# Toolchain: scripts/lang-toolchains.sh js. Prints each component's size and build time.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(realpath -m "$1")
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$root/target/lang-toolchains}
qjs=$toolchains/npm/node_modules/.bin/componentize-qjs
[ -x "$qjs" ] || { echo "componentize-qjs is missing: run scripts/lang-toolchains.sh js" >&2; exit 1; }
mkdir -p "$out"
for js in "$here"/*.js; do
    name=$(basename "$js" .js)
    start=$(date +%s.%N)
    "$qjs" --sync --wit "$root/wit" --world core --js "$js" -o "$out/$name.wasm" >/dev/null
    printf '%-14s %9d bytes  %.1f s\n' "$name" "$(stat -c %s "$out/$name.wasm")" \
        "$(awk "BEGIN { print $(date +%s.%N) - $start }")"
done
