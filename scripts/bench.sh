#!/usr/bin/env bash
# Reproduces every figure in docs/PERFORMANCE.md with one command. Run it on a quiet machine:
# every figure is printed with the load average at the time it was taken.
#
#   ./scripts/bench.sh            # everything (builds first; the run itself takes about 5 min)
#   ./scripts/bench.sh --quick    # short runs, to check that it all works
#   ./scripts/bench.sh --only a,b # some scenarios (letters a–g)
#
# It builds jobhook, jobhook-dev (the stand-in of the memory scenario) and jobhook-bench with the
# `bench-host` profile (release at opt-level 3), the
# guest components (wasm32-wasip2) and the Extism peer plugin (wasm32-unknown-unknown), waits for
# the machine to settle after the build, then runs `jobhook-bench`, which prints the table and
# writes it to target/bench-runs/report.{md,json}.
#
# Scenario g runs the engine on PostgreSQL (a throwaway cluster the benchmark starts, as the tests
# do); as root, Debian's postgresql package is installed here when it is missing. Without it,
# scenario g is reported as skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get -o Acquire::Retries=3 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq postgresql >/dev/null) ||
        echo "warning: cannot install PostgreSQL; scenario g will be skipped" >&2
fi
rustup target add wasm32-wasip2 wasm32-unknown-unknown >/dev/null
cargo build --profile bench-host -p jobhook -p jobhook-dev -p jobhook-bench --bins
target_dir="${CARGO_TARGET_DIR:-target}"
bench="$target_dir/bench-host/jobhook-bench"
# Guests and the plugin are built by jobhook-bench itself on first use (before measuring);
# build them now so the settling pause below covers that build too.
"$bench" --prepare
settle="${BENCH_SETTLE_SECONDS:-30}"
echo "letting the machine settle for ${settle} s after the build; load now: $(cut -d' ' -f1-3 /proc/loadavg)"
sleep "$settle"
exec "$bench" "$@"
