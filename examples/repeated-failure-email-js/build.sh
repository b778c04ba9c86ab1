#!/usr/bin/env bash
# Builds handler.js into a component for the jobhook:handler/with-mail world.
#   examples/repeated-failure-email-js/build.sh OUTPUT.wasm
# The toolchain comes from scripts/lang-toolchains.sh js (componentize-qjs, pinned there).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTPUT.wasm" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(realpath -m "$1")
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$root/target/lang-toolchains}
qjs=$toolchains/npm/node_modules/.bin/componentize-qjs
[ -x "$qjs" ] || { echo "componentize-qjs is missing: run scripts/lang-toolchains.sh js" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
# --sync: the non-async QuickJS runtime. The default runtime uses the component-model async ABI,
# which the engine does not enable.
"$qjs" --sync --wit "$root/wit" --world with-mail --js "$here/handler.js" -o "$out" >/dev/null
echo "$out: $(stat -c %s "$out") bytes"
