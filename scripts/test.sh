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
# Installing them needs npm (Node.js 18+) and Python's venv with ensurepip, so Debian's nodejs,
# npm and python3-venv are installed here when missing.
# libfaketime (host/tests/clock.rs) is installed the same way.
# The fault tests (host/tests/faults.rs) mount a small tmpfs to fill a disk, an ext4 image
# (e2fsprogs' `mkfs.ext4`, a loop device) to turn a file system read-only, and take an address
# off the loopback interface (iproute2's `ip`) to silence a network; that needs root, so as root
# JOBHOOK_REQUIRE_FAULTS=1 makes them fail instead of saying SKIPPED when they cannot.
# The power-loss tests mount a FUSE filesystem (tests/powerloss-fs) through /dev/fuse and Debian's
# fuse3 package (fusermount3); they fail without them unless JOBHOOK_SKIP_FUSE=1 is set explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null

# The tests build while the packages below install: compiling needs none of them. A failure
# here is reported by the `cargo test` at the end, which builds whatever is left.
mkdir -p target
build_log=target/test-build.log
echo "test.sh: building the tests in the background while packages install (log: $build_log)"
cargo test --workspace --no-run "$@" >"$build_log" 2>&1 &
build=$!
# If a step below stops the script, the build does not outlive it.
trap 'kill "$build" 2>/dev/null || true' EXIT

have_initdb() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
have_fusermount() { command -v fusermount3 >/dev/null; }
have_mono() { command -v mcs >/dev/null && command -v mono >/dev/null && compgen -G '/usr/lib/mono/4.5/System.Net.Http.dll' >/dev/null; }
# libfaketime steps the engine's wall clock in host/tests/clock.rs; that test fails without it
# unless JOBHOOK_SKIP_FAKETIME=1.
have_faketime() { [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; }
have_ip() { command -v ip >/dev/null; }
have_mkfs_ext4() { command -v mkfs.ext4 >/dev/null; }
# scripts/lang-toolchains.sh installs componentize-qjs with npm and componentize-py into a
# virtualenv. Debian ships the venv module without ensurepip (python3-venv brings it), so
# `python3 -m venv` runs but cannot create a virtualenv with pip: look for ensurepip instead.
have_npm() { command -v npm >/dev/null; }
have_venv() { python3 -c 'import ensurepip' >/dev/null 2>&1; }

# Every missing Debian package in one `apt-get update` and one install (each update fetches the
# package lists again); if that install fails, each group on its own, so one package that cannot
# be installed does not keep the others out.
groups=()
have_initdb || groups+=("postgresql|PostgreSQL; its tests will be SKIPPED")
have_fusermount || groups+=("fuse3|fuse3; the power-loss tests will fail (JOBHOOK_SKIP_FUSE=1 skips them)")
have_mono || groups+=("mono-mcs mono-runtime libmono-system-net-http4.0-cil|Mono; the forwarder tests will fail (JOBHOOK_SKIP_MONO=1 skips them)")
have_ip || groups+=("iproute2|iproute2; the silent-network fault test will fail when run as root")
have_mkfs_ext4 || groups+=("e2fsprogs|e2fsprogs; the read-only file system fault test will fail when run as root")
have_faketime || groups+=("libfaketime|libfaketime; the clock-step test will fail (JOBHOOK_SKIP_FAKETIME=1 skips it)")
if [ "${JOBHOOK_SKIP_LANGS:-0}" != 1 ]; then
    have_npm || groups+=("nodejs npm|Node.js and npm; scripts/lang-toolchains.sh will fail (JOBHOOK_SKIP_LANGS=1 skips it)")
    have_venv || groups+=("python3-venv|python3-venv; scripts/lang-toolchains.sh will fail (JOBHOOK_SKIP_LANGS=1 skips it)")
fi
# A mirror that drops a connection is tried again (Acquire::Retries) rather than failing the run.
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 "$@"; }
apt_install() { apt_get install -y -qq "$@" >/dev/null; }
if [ ${#groups[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    all=()
    for group in "${groups[@]}"; do
        read -ra packages <<<"${group%%|*}"
        all+=("${packages[@]}")
    done
    echo "test.sh: apt-get install ${all[*]}"
    if ! { apt_get update -qq && apt_install "${all[@]}"; }; then
        # The update itself may be what failed: once more before each group is tried alone.
        apt_get update -qq || echo "warning: apt-get update failed; installing from the lists there are" >&2
        for group in "${groups[@]}"; do
            read -ra packages <<<"${group%%|*}"
            apt_install "${packages[@]}" || echo "warning: cannot install ${group#*|}" >&2
        done
    fi
fi

if have_initdb; then
    export JOBHOOK_REQUIRE_POSTGRES=1
fi
if [ "$(id -u)" = 0 ]; then
    export JOBHOOK_REQUIRE_FAULTS=1
fi

if [ "${JOBHOOK_SKIP_LANGS:-0}" != 1 ]; then
    scripts/lang-toolchains.sh
fi

wait "$build" || echo "test.sh: the background build failed (see $build_log); cargo test says why"
cargo test --workspace "$@"
