#!/usr/bin/env bash
# Runs every test. Set-up on a fresh machine: the wasm32-wasip2 target (the tests build every
# guest component from source) and Debian's PostgreSQL server package for the shared-store tests
# (they start a private throwaway cluster of their own). If PostgreSQL cannot be installed, its
# tests say SKIPPED; once it is installed, JOBHOOK_REQUIRE_POSTGRES=1 makes them fail instead of
# skipping, so a broken set-up cannot pass by skipping. The Keyfactor-side forwarder (C#) is
# compiled and run with Mono (mcs, mono, System.Net.Http); its tests fail without them unless
# JOBHOOK_SKIP_MONO=1 is set explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null

have_initdb() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
if ! have_initdb && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) ||
        echo "warning: cannot install PostgreSQL; its tests will be SKIPPED" >&2
fi
if have_initdb; then
    export JOBHOOK_REQUIRE_POSTGRES=1
fi

have_mono() { command -v mcs >/dev/null && command -v mono >/dev/null && compgen -G '/usr/lib/mono/4.5/System.Net.Http.dll' >/dev/null; }
if ! have_mono && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        mono-mcs mono-runtime libmono-system-net-http4.0-cil >/dev/null) ||
        echo "warning: cannot install Mono; the forwarder tests will fail (JOBHOOK_SKIP_MONO=1 skips them)" >&2
fi

cargo test --workspace "$@"
