#!/usr/bin/env bash
# Builds jobhook and the example handlers, starts the Keyfactor API stand-in and
# `jobhook serve --config examples/jobhook.toml` (SQLite, file mail outbox), posts the examples'
# sample contexts, and shows every recorded outcome and the mail written to the outbox.
# The engine keeps running until ctrl-c; with DEMO_ONCE=1 it stops after the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null
examples=(log-context repeated-failure-email job-history-lookup acknowledge-failed-job)
cargo build --release --target wasm32-wasip2 --target-dir target/guests \
    $(printf -- '-p %s ' "${examples[@]}")
cargo build -p jobhook -p jobhook-dev
target_dir="${CARGO_TARGET_DIR:-target}"
jobhook="$target_dir/debug/jobhook"
jobhook_dev="$target_dir/debug/jobhook-dev"
url=http://127.0.0.1:8480
rm -rf target/demo && mkdir -p target/demo
# A checkout leaves the stand-in's password file readable by every user, which the engine warns
# of (as it would of a real secret); the demo makes it its owner's only.
chmod 600 examples/standin-password.txt

"$jobhook_dev" standin --listen 127.0.0.1:8081 >target/demo/standin.log 2>&1 &
standin=$!
"$jobhook" serve --config examples/jobhook.toml >target/demo/serve.out 2>target/demo/serve.log &
engine=$!
trap 'kill $engine $standin 2>/dev/null; wait $engine 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    grep -q "jobhook listening" target/demo/serve.out 2>/dev/null && break
    kill -0 $engine 2>/dev/null || { cat target/demo/serve.log; exit 1; }
    sleep 0.1
done
echo "engine: $url (log: target/demo/serve.log); Keyfactor stand-in: http://127.0.0.1:8081/KeyfactorAPI/"

cat >target/demo/show_event.py <<'PY'
import json, sys
def esc(text):
    # Handler text is shown escaped: no control character or bidi override reaches the terminal.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
e = json.load(sys.stdin)
c = e["context"]
print("event %s: %s %s, retries %s" % (e["id"], c["JobType"], c["JobResult"], c["CurrentRetryCount"]))
for d in e["deliveries"]:
    print("  %-24s %-10s attempt %s  %.2f ms  %s"
          % (d["handler"], d["state"], d["attempt"], d["duration_ms"] or 0, esc(d["reason"] or "")))
    for line in d["logs"][:4]:
        print("      [%s] %s" % (line["level"], esc(line["message"])))
PY

post() {
    local context=$1
    echo
    echo "\$ curl -X POST $url/v1/job-complete --data @$context"
    local answer id
    answer=$(curl -sS -X POST "$url/v1/job-complete" -H 'content-type: application/json' --data "@$context")
    echo "$answer"
    id=$(printf '%s' "$answer" | python3 -c 'import json,sys; print(json.load(sys.stdin)["event_id"])')
    for _ in $(seq 1 100); do
        event=$(curl -sS "$url/v1/events/$id")
        printf '%s' "$event" | python3 -c '
import json, sys
def esc(text):
    # Handler text is shown escaped: no control character or bidi override reaches the terminal.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
e = json.load(sys.stdin)
sys.exit(0 if all(d["state"] in ("succeeded", "failed", "skipped") for d in e["deliveries"]) else 1)' && break
        sleep 0.1
    done
    printf '%s' "$event" | python3 target/demo/show_event.py
}

post examples/log-context/contexts/sample.json
post examples/job-history-lookup/contexts/inventory.json
post examples/repeated-failure-email/contexts/succeeded.json
post examples/repeated-failure-email/contexts/failed-after-retries.json
post examples/acknowledge-failed-job/contexts/failed-inventory.json

echo
echo "mail outbox (target/demo/outbox):"
for f in target/demo/outbox/*; do
    [ -e "$f" ] || { echo "  (empty)"; break; }
    echo "  $f"
    grep -E '^(From|To|Subject):' "$f" | sed 's/^/    /'
done
echo
echo "\$ curl $url/healthz"
curl -sS "$url/healthz"
echo
if [ "${DEMO_ONCE:-}" = 1 ]; then
    exit 0
fi
echo
echo "jobhook is running at $url — try: $jobhook_dev load --url $url --rate 200 --seconds 5"
echo "press ctrl-c to stop"
wait $engine
