#!/usr/bin/env bash
# Runs every test. Set-up on a fresh machine: the wasm32-wasip2 target (the tests build every
# guest component from source) and Debian's PostgreSQL server package for the shared-store tests
# (they start a private throwaway cluster of their own). If PostgreSQL cannot be installed, its
# tests say SKIPPED; once it is installed, JOBHOOK_REQUIRE_POSTGRES=1 makes them fail instead of
# skipping, so a broken set-up cannot pass by skipping. The Keyfactor-side forwarder (C#) is
# compiled and run with Mono (mcs, mono, System.Net.Http); its tests fail without them unless
# JOBHOOK_SKIP_MONO=1 is set explicitly. The C, JavaScript and Python toolchains
# (scripts/lang-toolchains.sh) are installed too: host/tests/languages.rs builds handlers in those
# languages from source and fails when a toolchain is missing, unless JOBHOOK_SKIP_LANGS=1.
# libfaketime (host/tests/clock.rs) is installed the same way.
# The fault tests (host/tests/faults.rs) mount a small tmpfs to fill a disk; that needs root, so
# as root JOBHOOK_REQUIRE_FAULTS=1 makes them fail instead of saying SKIPPED when they cannot.
# The power-loss tests mount a FUSE filesystem (tests/powerloss-fs) through /dev/fuse and Debian's
# fuse3 package (fusermount3); they fail without them unless JOBHOOK_SKIP_FUSE=1 is set explicitly.
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

if [ "$(id -u)" = 0 ]; then
    export JOBHOOK_REQUIRE_FAULTS=1
fi

have_fusermount() { command -v fusermount3 >/dev/null; }
if ! have_fusermount && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null) ||
        echo "warning: cannot install fuse3; the power-loss tests will fail (JOBHOOK_SKIP_FUSE=1 skips them)" >&2
fi

have_mono() { command -v mcs >/dev/null && command -v mono >/dev/null && compgen -G '/usr/lib/mono/4.5/System.Net.Http.dll' >/dev/null; }
if ! have_mono && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        mono-mcs mono-runtime libmono-system-net-http4.0-cil >/dev/null) ||
        echo "warning: cannot install Mono; the forwarder tests will fail (JOBHOOK_SKIP_MONO=1 skips them)" >&2
fi

# libfaketime steps the engine's wall clock in host/tests/clock.rs; that test fails without it
# unless JOBHOOK_SKIP_FAKETIME=1.
have_faketime() { [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; }
if ! have_faketime && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfaketime >/dev/null) ||
        echo "warning: cannot install libfaketime; the clock-step test will fail (JOBHOOK_SKIP_FAKETIME=1 skips it)" >&2
fi

if [ "${JOBHOOK_SKIP_LANGS:-0}" != 1 ]; then
    scripts/lang-toolchains.sh
fi

cargo test --workspace "$@"
