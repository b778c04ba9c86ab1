#!/usr/bin/env bash
# Smoke test of handlers written in C, JavaScript and Python: installs the pinned toolchains,
# checks the WIT worlds and the C bindings, builds the three repeated-failure-email examples and
# the hostile guests from source, and runs each through `jobhook inspect` and `jobhook run`,
# printing one line per run (outcome class, time, reason) and how long each step took.
#
#   scripts/lang-smoke.sh [JOBHOOK]     (default: target/debug/jobhook)
#
# The C, JavaScript and Python examples must succeed (and mail exactly once, for the
# over-threshold context), and every JavaScript and Python guest gets the outcome class
# docs/LANGUAGES.md reports (libpython's wasi:sockets imports are linked inert). The same
# expectations are held by the tests in host/tests/languages.rs; this script shows the runs one
# line each, with timings. Exits non-zero when a build fails or an expectation does not hold.
# Outputs go to target/lang/.
set -euo pipefail
cd "$(dirname "$0")/.."
jobhook=$(realpath "${1:-target/debug/jobhook}")
[ -x "$jobhook" ] || { echo "no jobhook binary at $jobhook (cargo build -p jobhook)" >&2; exit 2; }
out=$PWD/target/lang
rm -rf "$out" && mkdir -p "$out"
failures=0

step() {
    local what=$1 start=$SECONDS
    shift
    "$@"
    echo "lang-smoke: $what: $((SECONDS - start)) s"
}

# Prints "class  duration  reason" of one `jobhook run --json` output (file $1).
summary() {
    python3 - "$1" <<'PY'
import json, sys
text = open(sys.argv[1]).read().strip()
try:
    o = json.loads(text.splitlines()[-1])
except (ValueError, IndexError):
    print("%-15s %9s  %s" % ("load-refused", "-", text.replace("\n", " ")[:160]))
    sys.exit()
reason = o.get("reason") or o.get("message") or o.get("detail") or ""
if o.get("limit"):
    reason = "%s: %s" % (o["limit"], reason)
if o.get("code"):
    reason = "%s: %s" % (o["code"], reason)
extra = " [logs kept %d, dropped %d]" % (len(o.get("logs", [])), o.get("logs_dropped", 0))
print("%-15s %7.0f ms  %s%s" % (o["class"], o["duration_ms"], reason.replace("\n", " ")[:140], extra))
PY
}

# run NAME EXPECTED_CLASS COMPONENT ARGS...: runs it, prints the summary, checks the class.
run() {
    local name=$1 expected=$2 component=$3
    shift 3
    local log=$out/runs/$name.json
    mkdir -p "$(dirname "$log")"
    "$jobhook" run "$component" --json "$@" >"$log" 2>&1 || true
    local line class
    line=$(summary "$log")
    class=${line%% *}
    printf '  %-34s %s\n' "$name" "$line"
    if [ -n "$expected" ] && [ "$class" != "$expected" ]; then
        echo "    expected $expected" >&2
        failures=$((failures + 1))
    fi
}

step "toolchains" scripts/lang-toolchains.sh
step "WIT worlds" scripts/check-wit-worlds.sh
step "C bindings" scripts/check-c-bindings.sh

for lang in c js py; do
    step "build repeated-failure-email-$lang" \
        "examples/repeated-failure-email-$lang/build.sh" "$out/repeated_failure_email_$lang.wasm"
done
step "build tests/guests-js" tests/guests-js/build.sh "$out/guests-js"
step "build tests/guests-py" tests/guests-py/build.sh "$out/guests-py"
step "build tests/guests-c" tests/guests-c/build.sh "$out/guests-c"

contexts=examples/repeated-failure-email/contexts
props=(--property RetryThreshold=3 --property "EmailRecipients=pki-team@example.com, oncall@example.com")
for lang in c js py; do
    component=$out/repeated_failure_email_$lang.wasm
    echo "repeated-failure-email-$lang ($(stat -c %s "$component") bytes):"
    start=$(date +%s%N)
    "$jobhook" inspect "$component" >"$out/inspect-$lang.txt" 2>&1 || true
    echo "  inspect: $(( ($(date +%s%N) - start) / 1000000 )) ms (compiles the component; see $out/inspect-$lang.txt)"
    for ctx in failed-after-retries failed-first-try succeeded; do
        run "$lang/$ctx" succeeded "$component" --context "$contexts/$ctx.json" \
            --mail-outbox "$out/outbox-$lang-$ctx" "${props[@]}"
        # No outbox directory is made until a mail is written: none is no mail, not a failure
        # (under pipefail a failing find would end the script without a word).
        mails=0
        if [ -d "$out/outbox-$lang-$ctx" ]; then
            mails=$(find "$out/outbox-$lang-$ctx" -name '*.eml' | wc -l)
        fi
        want=0
        [ $ctx = failed-after-retries ] && want=1
        if [ "$mails" != $want ]; then
            echo "    expected $want mail(s), found $mails" >&2
            failures=$((failures + 1))
        fi
    done
    run "$lang/bad-threshold" handler-failed \
        "$component" --context "$contexts/failed-after-retries.json" \
        --mail-outbox "$out/outbox-$lang-bad" --property RetryThreshold=abc \
        --property EmailRecipients=pki-team@example.com
done

# The outcome class each guest gets today. JavaScript has no panic or abort of its own: an
# uncaught Error or string is the handler's err; any other thrown value panics the runtime.
declare -A js_expected=(
    [healthy]=succeeded [throw]=handler-failed [type-error]=handler-failed
    [throw-value]=panicked [loop]=timed-out [memory-bomb]=limit-exceeded
    [log-flood]=succeeded [recursion]=limit-exceeded
)
# What the Python guests get (wasi:sockets linked inert: every attempt denied).
declare -A py_expected=(
    [healthy]=succeeded [hostile_raise]=panicked [hostile_exit]=trapped
    [hostile_abort]=trapped [hostile_loop]=timed-out [hostile_memory_bomb]=limit-exceeded
    [hostile_log_flood]=succeeded [hostile_recursion]=limit-exceeded [hostile_sockets]=succeeded
)
# What the C guests get (the template's bindings; docs/LANGUAGES.md's C table).
declare -A c_expected=(
    [healthy]=succeeded [abort]=trapped [exit]=trapped [loop]=timed-out
    [memory-bomb]=limit-exceeded [recursion]=trapped [log-flood]=succeeded
)
# Each folder's guests are one component; its handler property `guest` picks the module to run.
echo "tests/guests-js (core world, one component):"
for name in $(printf '%s\n' "${!js_expected[@]}" | sort); do
    run "js/$name" "${js_expected[$name]}" "$out/guests-js/guests.wasm" \
        --context "$contexts/failed-after-retries.json" --timeout-ms 2000 --property "guest=$name"
done
echo "tests/guests-py (core world, one component):"
for name in $(printf '%s\n' "${!py_expected[@]}" | sort); do
    run "py/$name" "${py_expected[$name]}" "$out/guests-py/guests.wasm" \
        --context "$contexts/failed-after-retries.json" --timeout-ms 2000 --property "guest=$name"
done

echo "tests/guests-c (handler world, imports what it calls; one component):"
for name in $(printf '%s\n' "${!c_expected[@]}" | sort); do
    run "c/$name" "${c_expected[$name]}" "$out/guests-c/guests.wasm" \
        --context "$contexts/failed-after-retries.json" --timeout-ms 2000 --property "guest=$name"
done

if [ $failures -gt 0 ]; then
    echo "lang-smoke: $failures expectation(s) failed" >&2
    exit 1
fi
echo "lang-smoke: all expectations held"
