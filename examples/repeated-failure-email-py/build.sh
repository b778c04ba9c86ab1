#!/usr/bin/env bash
# Builds app.py into a component for the jobhook:handler/with-mail world.
#   examples/repeated-failure-email-py/build.sh OUTPUT.wasm
# The toolchain comes from scripts/lang-toolchains.sh py (componentize-py, pinned there).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTPUT.wasm" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(realpath -m "$1")
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$root/target/lang-toolchains}
cpy=$toolchains/py/bin/componentize-py
[ -x "$cpy" ] || { echo "componentize-py is missing: run scripts/lang-toolchains.sh py" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
# componentize-py generates the `wit_world` bindings from the WIT itself, bundles app.py with
# CPython and its standard library, and snapshots the initialised interpreter.
"$cpy" -d "$root/wit" -w with-mail componentize -p "$here" app -o "$out" >/dev/null
echo "$out: $(stat -c %s "$out") bytes"
