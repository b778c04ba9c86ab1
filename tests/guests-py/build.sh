#!/usr/bin/env bash
# Builds every guest here (NAME.py) into OUTDIR/NAME.wasm for the jobhook:handler/core world.
#   tests/guests-py/build.sh OUTDIR
# Toolchain: scripts/lang-toolchains.sh py. Prints each component's size and build time.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(realpath -m "$1")
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$root/target/lang-toolchains}
cpy=$toolchains/py/bin/componentize-py
[ -x "$cpy" ] || { echo "componentize-py is missing: run scripts/lang-toolchains.sh py" >&2; exit 1; }
mkdir -p "$out"
for py in "$here"/*.py; do
    name=$(basename "$py" .py)
    start=$(date +%s.%N)
    # Each guest is built alone (a copy in a folder of its own), so no other guest is bundled.
    src=$(mktemp -d)
    cp "$py" "$src/"
    "$cpy" -d "$root/wit" -w core componentize -p "$src" "$name" -o "$out/$name.wasm" >/dev/null
    rm -rf "$src"
    printf '%-20s %9d bytes  %.1f s\n' "$name" "$(stat -c %s "$out/$name.wasm")" \
        "$(awk "BEGIN { print $(date +%s.%N) - $start }")"
done
