#!/usr/bin/env bash
# Build the service image with podman, run it, and check it against `python -m service` on the host:
# readiness, the image's HEALTHCHECK, the non-root uid, JSON and multipart predict and an evaluate
# whose numbers must equal the host server's (deploy/container/compare.py): the image serves with
# LiteRT (no TensorFlow in it), the host with Keras (CALIB_RUNTIME=keras), so this also checks the
# two runtimes against each other. Prints build seconds, image size and start-to-ready seconds.
# Called by .ci/run after the tests.
#
# Idempotent: installs and configures podman only when missing, makes a stand-in base image only
# when python:3.11-slim is absent (no registry is reachable in CI), removes its container on exit.
#
# Environment:
#   PYTHON       host interpreter with the project installed (default .venv/bin/python, as `make test` makes)
#   IMAGE        tag to build (default calib-service:check)
#   BUILD_ARGS   extra `podman build` arguments, e.g. "--build-arg TF_PACKAGE=tensorflow"
#   SKIP_BUILD=1 check an image built before
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=${IMAGE:-calib-service:check}
BASE=docker.io/library/python:3.11-slim
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
NAME="calib-check-$$"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
# (`command`: the function must not call itself)
podman() { if [ -n "$sudo" ]; then sudo podman "$@"; else command podman "$@"; fi; }

host_pid=""
cleanup() {
  podman rm -f --time 5 "$NAME" > /dev/null 2>&1 || true
  if [ -n "$host_pid" ]; then kill "$host_pid" 2> /dev/null || true; wait "$host_pid" 2> /dev/null || true; fi
}
trap cleanup EXIT

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Seconds until GET $1 answers 200 (fails after $2 s).
wait_ready() {
  local url=$1 limit=$2 start=$SECONDS
  until curl -fsS -o /dev/null "$url" 2> /dev/null; do
    if (( SECONDS - start > limit )); then echo "not ready after ${limit}s: $url" >&2; return 1; fi
    sleep 0.5
  done
}

install_podman() {
  if command -v podman > /dev/null && command -v runc > /dev/null; then return; fi
  echo "== installing podman"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc iptables debootstrap curl > /dev/null
}

# runc: crun 1.8 fails on hybrid cgroups ("cgroups in hybrid mode not supported"). Ulimits: podman's
# defaults exceed a container host's hard limits (setrlimit RLIMIT_NOFILE: Operation not permitted),
# so the containers get the host's own hard limits. Only written when there is no configuration yet.
configure_podman() {
  local conf=/etc/containers/containers.conf
  if [ -e "$conf" ]; then return; fi
  local nofile nproc pid_max
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  pid_max=$(cat /proc/sys/kernel/pid_max)
  if [ "$nproc" = unlimited ] || (( nproc > pid_max )); then nproc=$pid_max; fi
  if [ "$nofile" = unlimited ]; then nofile=1048576; fi
  echo "== writing $conf (runtime runc, ulimits nofile=$nofile nproc=$nproc)"
  printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n\n[engine]\nruntime = "runc"\n' \
    "$nofile" "$nofile" "$nproc" "$nproc" | $sudo tee "$conf" > /dev/null
}

# A stand-in for python:3.11-slim from Debian bookworm (python3 is 3.11 there too), from the
# mirror apt already uses. The Dockerfile stays written for the real image.
make_base() {
  if podman image exists "$BASE"; then return; fi
  local mirror rootfs
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2> /dev/null || true)
  if [ -z "$mirror" ]; then mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2> /dev/null || true); fi
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d)
  echo "== no $BASE: debootstrap bookworm from $mirror as a stand-in"
  $sudo debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,netbase,tzdata \
    bookworm "$rootfs" "$mirror" > /dev/null
  $sudo ln -sf python3 "$rootfs/usr/bin/python"
  $sudo rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  $sudo rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  $sudo tar -C "$rootfs" -c . | podman import - "$BASE" > /dev/null
  $sudo rm -rf "$rootfs"
}

build() {
  # The host's package index settings, when set in the environment (a file:// index is not
  # reachable from inside the build). The CA bundle is mounted because downloads may pass a
  # TLS-intercepting proxy; podman passes the host's *_proxy variables by default.
  local args=(--pull=never --format docker -t "$IMAGE")
  local var
  for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
    if [ -n "${!var:-}" ] && [[ "${!var}" != *file://* ]]; then args+=(--build-arg "$var=${!var}"); fi
  done
  if [ -f "$CA_BUNDLE" ]; then
    args+=(--volume "$CA_BUNDLE:$CA_BUNDLE:ro" --build-arg "PIP_CERT=$CA_BUNDLE")
  fi
  # shellcheck disable=SC2206  # BUILD_ARGS is a list of words on purpose
  args+=(${BUILD_ARGS:-})
  echo "== podman build ${args[*]} ."
  local start=$SECONDS
  podman build "${args[@]}" . > /tmp/calib-container-build.log 2>&1 || { tail -40 /tmp/calib-container-build.log; return 1; }
  build_seconds=$(( SECONDS - start ))
}

install_podman
configure_podman
make_base
build_seconds="(not built)"
if [ "${SKIP_BUILD:-0}" != 1 ]; then build; fi

port=$(free_port)
echo "== podman run $IMAGE on 127.0.0.1:$port"
t0=$EPOCHREALTIME
podman run -d --name "$NAME" -p "127.0.0.1:$port:8000" "$IMAGE" > /dev/null
if ! wait_ready "http://127.0.0.1:$port/health/ready" 300; then podman logs "$NAME" | tail -30; exit 1; fi
ready_seconds=$(awk -v a="$t0" -v b="$EPOCHREALTIME" "BEGIN {printf \"%.1f\", b - a}")

echo "== HEALTHCHECK"
podman healthcheck run "$NAME" || { echo "HEALTHCHECK failed" >&2; exit 1; }
uid=$(podman exec "$NAME" id -u)
if [ "$uid" != 10001 ]; then echo "the server runs as uid $uid, not 10001" >&2; exit 1; fi

echo "== only the server's code and console scripts"
# no training package (the server never imports it), and only the console scripts that work here
if podman exec "$NAME" python -c "import training" 2> /dev/null; then
  echo "the image holds the training package" >&2; exit 1
fi
scripts=$(podman exec "$NAME" sh -c 'cd /opt/venv/bin && ls calib-*' | tr '\n' ' ')
if [ "$scripts" != "calib-client calib-serve " ]; then echo "console scripts in the image: $scripts" >&2; exit 1; fi
podman exec "$NAME" calib-client --help > /dev/null

hport=$(free_port)
echo "== python -m service on the host (CALIB_RUNTIME=keras), 127.0.0.1:$hport"
CALIB_RUNTIME=keras CALIB_PORT=$hport CALIB_HOST=127.0.0.1 "$PYTHON" -m service > /tmp/calib-host-server.log 2>&1 &
host_pid=$!
if ! wait_ready "http://127.0.0.1:$hport/health/ready" 300; then tail -30 /tmp/calib-host-server.log; exit 1; fi

"$PYTHON" deploy/container/compare.py "http://127.0.0.1:$port" "http://127.0.0.1:$hport"

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "== figures for $IMAGE"
printf '  %-22s %s\n' "build seconds" "$build_seconds" \
  "image size" "$size bytes ($(( size / 1000000 )) MB)" \
  "start to ready" "$ready_seconds s" \
  "uid" "$uid" \
  "healthcheck" "healthy"
echo "container check passed"
