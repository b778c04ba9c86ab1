#!/usr/bin/env bash
# Checks the worlds of wit/jobhook.wit against each other:
# - `handler` imports exactly the union of what `with-mail`, `with-keyfactor` and `with-http`
#   import, and every world has the same single export, `run-handler`;
# - `core` imports exactly properties, log, delivery (and types, which they use);
# - each `with-X` world imports exactly `core`'s interfaces plus X.
# Uses wasm-tools (scripts/lang-toolchains.sh py installs it) to encode a dummy component per
# world and print its imports and exports.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$PWD/target/lang-toolchains}
wasm_tools=${WASM_TOOLS:-$toolchains/py/bin/wasm-tools}
[ -x "$wasm_tools" ] || { echo "wasm-tools is missing: run scripts/lang-toolchains.sh py" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The sorted import lines (`import jobhook:handler/log@<version>;`) or export lines of `world`.
items() {
    local world=$1 kind=$2
    if [ ! -f "$tmp/$world.wasm" ]; then
        "$wasm_tools" component embed --dummy wit --world "$world" -o "$tmp/$world.core.wasm"
        "$wasm_tools" component new "$tmp/$world.core.wasm" -o "$tmp/$world.wasm"
        "$wasm_tools" component wit "$tmp/$world.wasm" >"$tmp/$world.wit"
    fi
    grep -E "^\s*$kind " "$tmp/$world.wit" | sed -E 's/^\s+//' | sort -u
}

status=0
expect() {
    local what=$1 want=$2 got=$3
    if [ "$want" = "$got" ]; then
        echo "ok: $what"
    else
        echo "FAILED: $what" >&2
        diff <(echo "$want") <(echo "$got") >&2 || true
        status=1
    fi
}

version=$(sed -n 's/^package jobhook:handler@\(.*\);$/\1/p' wit/jobhook.wit)
iface() { printf "import jobhook:handler/%s@$version;\n" "$@" | sort; }

export_line=$(items handler export)
for world in core with-mail with-keyfactor with-http; do
    expect "$world exports what handler exports" "$export_line" "$(items "$world" export)"
done
expect "core imports properties, log, delivery, types" \
    "$(iface properties log delivery types)" "$(items core import)"
for cap in mail keyfactor http; do
    expect "with-$cap imports core plus $cap" \
        "$(iface properties log delivery types "$cap")" "$(items "with-$cap" import)"
done
expect "handler imports the union of the with-* worlds" \
    "$( (items with-mail import; items with-keyfactor import; items with-http import) | sort -u)" \
    "$(items handler import)"
exit $status
