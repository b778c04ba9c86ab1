#!/usr/bin/env bash
# Checks that the checked-in C bindings (examples/*-c/bindings and the `jobhook new --lang c`
# template's host/templates/c/bindings) match wit/.
#
# With wit-bindgen installed (scripts/lang-toolchains.sh --with-wit-bindgen c), regenerates them
# and compares every file; `--update` writes the regenerated files and the new WIT hash instead.
# Without it, compares the SHA-256 of wit/jobhook.wit with the one recorded in
# bindings/GENERATED, so a WIT change without regenerated bindings still fails.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchains=${JOBHOOK_LANG_TOOLCHAINS:-$PWD/target/lang-toolchains}
wit_bindgen=$toolchains/cargo/bin/wit-bindgen
update=0
[ "${1:-}" = --update ] && update=1
wit_hash=$(sha256sum wit/jobhook.wit | cut -d' ' -f1)
status=0
for dir in examples/*-c/bindings host/templates/c/bindings; do
    world=$(sed -n 's/.*--world \([a-z-]*\).*/\1/p' "$dir/GENERATED")
    recorded=$(tail -n 1 "$dir/GENERATED")
    if [ -x "$wit_bindgen" ]; then
        fresh=$(mktemp -d)
        "$wit_bindgen" c wit --world "$world" --out-dir "$fresh" >"$fresh.log" 2>&1 ||
            { cat "$fresh.log" >&2; exit 1; }
        rm -f "$fresh.log"
        if [ $update = 1 ]; then
            cp "$fresh"/* "$dir/"
            sed -i "\$s/.*/$wit_hash/" "$dir/GENERATED"
            echo "$dir: regenerated for world $world"
        elif diff -r -q -x GENERATED "$fresh" "$dir" >/dev/null && [ "$recorded" = "$wit_hash" ]; then
            echo "$dir: matches wit/ (regenerated and compared)"
        else
            echo "$dir: out of date with wit/; run scripts/check-c-bindings.sh --update" >&2
            status=1
        fi
        rm -rf "$fresh"
    elif [ "$recorded" = "$wit_hash" ]; then
        echo "$dir: generated from the current wit/jobhook.wit (hash compared; wit-bindgen not installed)"
    else
        echo "$dir: wit/jobhook.wit changed since these bindings were generated; regenerate them:" >&2
        echo "  scripts/lang-toolchains.sh --with-wit-bindgen c && scripts/check-c-bindings.sh --update" >&2
        status=1
    fi
done
exit $status
