#!/usr/bin/env bash
# `make demo`: canhazgpu end to end against a private, throw-away Redis.
# Uses the real GPUs when `nvidia-smi -L` works, else the `fake` provider with 4 GPUs.
# Nothing outside a temporary directory is touched; Redis is stopped on exit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}

if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
  BOLD=$'\033[1m' RESET=$'\033[0m'
else
  BOLD='' RESET=''
fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }
chg() {  # echo the command as a user would type it, then run it
  local line='$ canhazgpu' a q="'"
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $a"; else line+=" '${a//$q/$q\\$q$q}'"; fi
  done
  printf '%s\n' "$line"
  "$PYTHON" canhazgpu.py "$@"
}
warn() { printf '(that step failed with exit %s; the demo goes on)\n' "$1"; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "Error: redis-server is not installed (run: make deps)" >&2
  exit 1
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/canhazgpu-demo.XXXXXX")
redis_pid=''
waiter_pid=''
web_pid=''
cleanup() {
  if [ -n "$waiter_pid" ]; then kill "$waiter_pid" 2>/dev/null; wait "$waiter_pid" 2>/dev/null; fi
  if [ -n "$web_pid" ]; then kill "$web_pid" 2>/dev/null; wait "$web_pid" 2>/dev/null; fi
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "Start a private Redis on a unix socket in $dir (no TCP port, nothing saved)"
redis-server --port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 \
  --save '' --appendonly no --daemonize no --dir "$dir" --logfile "$dir/redis.log" &
redis_pid=$!
ping_redis() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -s "$dir/redis.sock" ping 2>/dev/null)" = PONG ]
  else
    "$PYTHON" -c 'import redis, sys; redis.Redis(unix_socket_path=sys.argv[1]).ping()' \
      "$dir/redis.sock" >/dev/null 2>&1
  fi
}
for _ in $(seq 100); do
  ping_redis && break
  if ! kill -0 "$redis_pid" 2>/dev/null; then
    echo "Error: redis-server exited; its log:" >&2
    cat "$dir/redis.log" >&2
    exit 1
  fi
  sleep 0.1
done
ping_redis || { echo "Error: redis-server did not answer within 10 s" >&2; exit 1; }
export CANHAZGPU_REDIS_URL="unix://$dir/redis.sock"
echo "CANHAZGPU_REDIS_URL=$CANHAZGPU_REDIS_URL"

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ "${gpus:-0}" -gt 0 ]; then
  provider=nvidia
  why="nvidia-smi sees $gpus GPU(s), so we use the real ones"
else
  provider=fake gpus=4
  why="no working nvidia-smi here, so the 'fake' provider simulates 4 idle GPUs"
fi
first=$((gpus >= 2 ? 2 : 1))
rest=$((gpus - first))

step "Initialise the pool: $why"
chg admin --gpus "$gpus" --provider "$provider" --force || warn $?

step "Reserve $first GPU(s) for an hour of interactive work (--nonblock: fail, don't wait)"
chg reserve --gpus "$first" --duration 1h --note "demo" --nonblock || warn $?

step "See who holds what: our reservation, and the free GPUs"
chg status || warn $?

if [ "$rest" -gt 0 ]; then
  step "Run a job on 1 more GPU: canhazgpu reserves it, sets CUDA_VISIBLE_DEVICES, releases it at exit"
  # shellcheck disable=SC2016  # $CUDA_VISIBLE_DEVICES is for the job's shell, not ours
  chg run --gpus 1 -- sh -c 'echo "job: running on GPU(s) $CUDA_VISIBLE_DEVICES"' || warn $?

  step "Take the remaining $rest GPU(s) too, so the pool is full"
  chg reserve --gpus "$rest" --duration 1h --note "demo, rest" --nonblock --short || warn $?
fi

step "A job that needs 1 GPU now waits in the queue, in the background (at most 2 minutes)"
# shellcheck disable=SC2016
printf '%s\n' "\$ canhazgpu run --gpus 1 --wait 2m -- sh -c 'echo \"queued job: got GPU(s) \$CUDA_VISIBLE_DEVICES\"' &"
"$PYTHON" canhazgpu.py run --gpus 1 --wait 2m -- \
  sh -c 'echo "queued job: got GPU(s) $CUDA_VISIBLE_DEVICES"' &  # not via chg: $! is canhazgpu
waiter_pid=$!
sleep 1.5

step "Who is waiting"
chg queue || warn $?

step "Release our manual reservations: the waiting job gets a GPU at once"
chg release || warn $?
wait "$waiter_pid" || warn $?
waiter_pid=''

step "The pool again: every GPU is free, remembering who used it last"
chg status || warn $?

step "Usage report for the last day (finished and running reservations)"
chg report --days 1 || warn $?

step "The dashboard: \`canhazgpu web\` shows this pool in a browser, with a JSON API and metrics"
chg reserve --gpus 1 --duration 1h --note "see me on the dashboard" --nonblock --short || warn $?
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [ -t 0 ] && [ -t 1 ]; then
  echo "Open http://127.0.0.1:$port/ in a browser; Ctrl-C stops the dashboard and ends the demo"
  trap - INT  # Ctrl-C stops the server, which exits cleanly; then the demo cleans up
  chg web --host 127.0.0.1 --port "$port" || warn $?
  trap 'exit 130' INT
else  # not on a terminal (CI, a pipe): serve it just long enough to ask it once
  printf '$ canhazgpu web --host 127.0.0.1 --port %s &\n' "$port"
  "$PYTHON" canhazgpu.py web --host 127.0.0.1 --port "$port" &  # not via chg: $! is the server
  web_pid=$!
  "$PYTHON" - "$port" <<'EOF' || warn $?
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(100):
    try:
        rows = json.load(urllib.request.urlopen(url + "/api/status", timeout=5))
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("the dashboard did not answer within 10 s")
print(f"$ curl {url}/api/status")
for row in rows:
    line = f"  GPU {row['gpu_id']}: {row['status']:<10} {row.get('user', '')}  {row.get('note', '')}"
    print(line.rstrip())
metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
print(f"$ curl {url}/metrics | grep '^canhazgpu_gpus'")
for line in metrics.splitlines():
    if line.startswith("canhazgpu_gpus{"):
        print(" ", line)
EOF
  kill -TERM "$web_pid"
  wait "$web_pid" || warn $?
  web_pid=''
fi

step "Done: Redis is stopped and $dir removed"
