#!/usr/bin/env bash
# Builds guests.c into one component, OUTDIR/guests.wasm, against the `jobhook new --lang c`
# template's bindings (the jobhook:handler world; the linker keeps what guests.c calls).
#   tests/guests-c/build.sh OUTDIR
# Toolchain: scripts/lang-toolchains.sh c (clang 19, wasi-libc) and Rust's wasm-component-ld.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bindings=$root/host/templates/c/bindings
out=$(realpath -m "$1")
cc=${CC_WASM:-clang-19}
command -v "$cc" >/dev/null || { echo "$cc is missing: run scripts/lang-toolchains.sh c" >&2; exit 1; }
wcl="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/wasm-component-ld"
[ -x "$wcl" ] || { echo "wasm-component-ld is missing: rustup target add wasm32-wasip2" >&2; exit 1; }
obj=$(mktemp -d)
trap 'rm -rf "$obj"' EXIT
mkdir -p "$out"
# -O1: the guests' endless loops and recursion stay as written (no -Werror: they are meant to be
# wrong).
cflags=(--target=wasm32-wasi -O1 -Wall -I"$bindings")
"$cc" "${cflags[@]}" -Wno-infinite-recursion -c "$here/guests.c" -o "$obj/guests.o"
"$cc" "${cflags[@]}" -Wno-unused-parameter -c "$bindings/handler.c" -o "$obj/bindings.o"
"$cc" --target=wasm32-wasi -mexec-model=reactor -O1 -fuse-ld="$wcl" -Wl,--wasi-adapter=reactor \
    "$obj/guests.o" "$obj/bindings.o" "$bindings/handler_component_type.o" -o "$out/guests.wasm"
echo "$out/guests.wasm: $(stat -c %s "$out/guests.wasm") bytes"
