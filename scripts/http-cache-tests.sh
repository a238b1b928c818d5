#!/usr/bin/env bash
# Runs the public HTTP cache test suite (http-cache-tests, the suite behind
# cache-tests.fyi) against examples/http_cache_proxy.rs, a reverse proxy
# wrapped in CacheLayer (memory-only cache, policy TTL 3600 s), and prints
# the required and optimal pass counts next to the published results of
# nginx, Varnish, Squid and ATS, then the required tests still failing.
#
# With MIN_REQUIRED and MIN_OPTIMAL set (CI: 139 and 57), it fails when
# fewer tests pass.
#
# The suite is installed with npm into $CARGO_TARGET_DIR/http-cache-tests
# (default target/http-cache-tests), outside git. Its server and the proxy
# listen on free loopback ports and are stopped by pid on exit.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dir=$target/http-cache-tests
version=0.4.5

mkdir -p "$dir"
suite=$dir/node_modules/http-cache-tests
if [ ! -f "$suite/package.json" ] || ! grep -q "\"version\": \"$version\"" "$suite/package.json"; then
  [ -f "$dir/package.json" ] || echo '{"private": true}' > "$dir/package.json"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error "http-cache-tests@$version")
fi

(cd "$root" && cargo build --quiet --example http_cache_proxy)

free_port() {
  node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })'
}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

origin_port=$(free_port)
(cd "$suite" && exec env npm_config_protocol=http npm_config_port="$origin_port" \
  npm_config_pidfile="$dir/server.pid" node --import "$root/scripts/loopback.mjs" server/server.mjs) \
  > "$dir/server.log" 2>&1 &
pids+=($!)

ORIGIN="http://127.0.0.1:$origin_port" BIND=127.0.0.1:0 "$target/debug/examples/http_cache_proxy" \
  > "$dir/proxy.log" 2>&1 &
pids+=($!)

base=""
for _ in $(seq 1 100); do
  base=$(sed -n 's/^listening on //p' "$dir/proxy.log" | head -1)
  if [ -n "$base" ] && (exec 3<>"/dev/tcp/127.0.0.1/$origin_port") 2>/dev/null; then break; fi
  sleep 0.1
done
[ -n "$base" ] || { echo "the proxy did not start:" >&2; cat "$dir/proxy.log" >&2; exit 1; }

started=$(date +%s)
(cd "$suite" && npm_config_base="$base" npm_package_config_id="" node --no-warnings cli.mjs) > "$dir/results.json"
echo "suite run in $(( $(date +%s) - started )) s against $base (origin on port $origin_port)"
echo
node "$root/scripts/http-cache-score.mjs" "$suite" "$dir/results.json"
