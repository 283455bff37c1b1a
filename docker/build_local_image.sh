#!/usr/bin/env bash
# Build docker/Dockerfile.cpu with podman on a machine that reaches no container registry, start it and check it:
# GET /readyz answers 200, the image's HEALTHCHECK passes, and POST /v1/judge returns a verdict. Prints PASS or FAIL
# and exits non-zero on failure. `make image-cpu-smoke` runs it (as root: it may apt-get install podman).
#
# Steps (each reused when already done, so a second run only rebuilds what changed and re-checks):
#   1. podman + debootstrap from Debian's packages, if missing;
#   2. a Debian bookworm root filesystem made by debootstrap (python3, python3-venv, python3-dev), imported as the
#      local image $BASE_IMAGE: it stands in for python:3.11-slim-bookworm, which needs a registry;
#   3. podman build of docker/Dockerfile.cpu on that base (torch 2.13.0+cpu from a local wheel when pip here has
#      one in a find-links folder, else from the PyTorch CPU index, as on any other machine);
#   4. podman run on the host network at $PORT, probes, judge call, then the container is stopped and removed.
# CPU-heavy steps (debootstrap, build, the container's run) hold $LOCK so they never overlap other heavy jobs.
#
# Environment: HER_IMAGE (localhost/her-rm:cpu), HER_BASE_IMAGE (localhost/her-debian-base:bookworm),
#   HER_IMAGE_WORK (/var/tmp/her-image: the rootfs and logs), HER_IMAGE_PORT (18000), HER_READY_TIMEOUT (600 s),
#   HER_IMAGE_PRUNE (1: after the build, drop dangling images, i.e. the layers of earlier builds; 0: keep them),
#   HER_SKIP_BUILD (1: reuse the existing $IMAGE), HER_BUILD_CONTEXT (the repo root; or another checkout to build),
#   PODMAN (podman, e.g. "podman --storage-driver vfs"),
#   PODMAN_RUN_OPTS (runtime/ulimit options for build and run; unset: probed, see find_run_opts).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONTEXT="${HER_BUILD_CONTEXT:-$ROOT}"
IMAGE="${HER_IMAGE:-localhost/her-rm:cpu}"
BASE_IMAGE="${HER_BASE_IMAGE:-localhost/her-debian-base:bookworm}"
WORK="${HER_IMAGE_WORK:-/var/tmp/her-image}"
PORT="${HER_IMAGE_PORT:-18000}"
READY_TIMEOUT="${HER_READY_TIMEOUT:-600}"
PRUNE="${HER_IMAGE_PRUNE:-1}"
LOCK="${HER_CPU_LOCK:-/tmp/her-cpu.lock}"
NAME="her-rm-cpu-smoke-$$"
read -r -a PODMAN <<<"${PODMAN:-podman}"
MIRROR="${HER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { printf '[build_local_image] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; echo "FAIL"; exit 1; }
locked() {  # run "$@" holding $LOCK; -o: the lock is not inherited by what the command leaves running
  if ! flock -n -o "$LOCK" true; then log "waiting for $LOCK (another CPU-heavy job runs)"; fi
  # shellcheck disable=SC2016
  flock -o "$LOCK" bash -c 'date +%s >"$0"; exec "$@"' "$WORK/.lock-acquired" "$@"
}

# ---- 4. run and probe (defined first: the script re-enters itself as `$0 --smoke` under the lock, since loading
# the model and judging use the CPU) ----
cid=""  # global: the EXIT trap below runs after smoke() has returned
smoke() {
  local code body t0
  # shellcheck disable=SC2317  # called by the EXIT trap
  cleanup() {
    if [ -n "$cid" ]; then
      "${PODMAN[@]}" logs "$NAME" >"$WORK/container.log" 2>&1 || true
      "${PODMAN[@]}" rm -f -t 10 "$NAME" >/dev/null 2>&1 || true
    fi
  }
  trap cleanup EXIT
  trap 'exit 143' TERM INT  # exit through the EXIT trap: the container is removed on Ctrl-C too
  if python3 -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $PORT)) != 0)"; then
    fail "port $PORT is taken: set HER_IMAGE_PORT"
  fi
  log "starting $IMAGE as $NAME on 127.0.0.1:$PORT (host network)"
  # Host network: this sandbox has no container networking to rely on; RM_PORT moves the server and its healthcheck.
  read -r -a RUN_OPTS <<<"${PODMAN_RUN_OPTS:-}"
  cid=$("${PODMAN[@]}" run -d "${RUN_OPTS[@]}" --name "$NAME" --network host -e RM_PORT="$PORT" --shm-size 1g "$IMAGE" \
        2> >(grep -v 'systemd connection' >&2))  # no systemd here for podman's healthcheck timers: harmless
  t0=$(date +%s)
  while :; do
    code=$(python3 - "$PORT" <<'PY'
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=5)
    print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, type(e).__name__)
PY
)
    [ "${code%% *}" = 200 ] && break
    if [[ "$code" == *'"state":"failed"'* ]]; then
      "${PODMAN[@]}" logs --tail 60 "$NAME" 2>&1 | grep -v 'GET /readyz' >&2 || true
      fail "the server failed to load its model: $code"
    fi
    if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$NAME")" != true ]; then
      "${PODMAN[@]}" logs --tail 40 "$NAME" >&2 || true
      fail "container exited before it was ready (last /readyz: $code)"
    fi
    if (($(date +%s) - t0 > READY_TIMEOUT)); then
      "${PODMAN[@]}" logs --tail 40 "$NAME" >&2 || true
      fail "not ready after ${READY_TIMEOUT}s (last /readyz: $code)"
    fi
    sleep 2
  done
  log "ready after $(($(date +%s) - t0)) s: GET /readyz -> $code"
  if "${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1; then
    log "image HEALTHCHECK: healthy"
  else
    fail "the image's HEALTHCHECK failed while /readyz answered 200"
  fi
  t0=$(date +%s)
  body=$(python3 - "$PORT" <<'PY'
import json, sys, urllib.request
req = {"context": [{"role": "user", "content": "Mr Bennet: Lizzy, come into my room."}],
       "a": "<role_action>follows him</role_action>What is it, Papa?", "b": ":", "mode": "fast"}
r = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/judge", data=json.dumps(req).encode(),
                           headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(r, timeout=300) as resp:
        verdict = json.loads(resp.read())
except Exception as e:
    print(f"ERROR {type(e).__name__}: {getattr(e, 'read', lambda: b'')().decode() or e}")
    sys.exit(1)
print(json.dumps(verdict))
sys.exit(0 if isinstance(verdict, dict) and "status" in verdict else 1)
PY
) || { log "POST /v1/judge: $body"; fail "the judge call failed"; }
  log "POST /v1/judge (fast) in $(($(date +%s) - t0)) s -> $body"
  echo "PASS"
}

if [ "${1:-}" = --smoke ]; then
  smoke
  exit 0
fi

# ---- 1. tools ----
need_pkgs=()
command -v podman >/dev/null || need_pkgs+=(podman crun fuse-overlayfs slirp4netns uidmap containernetworking-plugins
                                            iptables)
command -v runc >/dev/null || need_pkgs+=(runc)  # the fallback runtime, see find_run_opts
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v flock >/dev/null || need_pkgs+=(util-linux)
if ((${#need_pkgs[@]})); then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    fail "missing ${need_pkgs[*]} (install them; needs root + apt)"
  fi
  log "installing ${need_pkgs[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
mkdir -p "$WORK"

# ---- 2. base image ----
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
  log "base image $BASE_IMAGE present"
else
  rootfs="$WORK/rootfs-bookworm"
  if [ ! -x "$rootfs/usr/bin/python3" ] || [ ! -f "$rootfs/.her-complete" ]; then
    log "debootstrap bookworm into $rootfs (log: $WORK/debootstrap.log)"
    rm -rf "$rootfs"
    locked debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
      bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap failed: see $WORK/debootstrap.log"
    # The same suites as the python:3.11-slim-bookworm image, in the same deb822 file.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
    touch "$rootfs/.her-complete"
  fi
  log "importing $rootfs as $BASE_IMAGE"
  tar --exclude=./.her-complete -C "$rootfs" -c . | "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi

# ---- 3. build ----
# Which OCI runtime and rlimits work here. In a sandbox without CAP_SYS_RESOURCE podman's default rlimits (nofile
# 1048576, nproc 4194304) cannot be set ("setrlimit RLIMIT_NPROC: Operation not permitted"), and crun refuses a
# cgroup v1/v2 hybrid host ("cgroups in hybrid mode not supported"); then runc with the limits we have works.
find_run_opts() {
  local rt lim hn hu opts
  hn=$(ulimit -Hn); hu=$(ulimit -Hu)
  for rt in "" runc; do
    command -v "${rt:-crun}" >/dev/null || [ -z "$rt" ] || continue
    for lim in "" "$hu" 32768 16384 4096; do
      opts=()
      [ -n "$rt" ] && opts+=(--runtime "$rt")
      [ -n "$lim" ] && [ "$hn" != unlimited ] && opts+=(--ulimit "nofile=$hn:$hn")
      [ -n "$lim" ] && [ "$lim" != unlimited ] && opts+=(--ulimit "nproc=$lim:$lim")
      if "${PODMAN[@]}" run --rm --network host "${opts[@]}" "$BASE_IMAGE" true >/dev/null 2>&1; then
        RUN_OPTS=("${opts[@]}"); return 0
      fi
    done
  done
  return 1
}
if [ -z "${PODMAN_RUN_OPTS+x}" ]; then
  find_run_opts || { "${PODMAN[@]}" run --rm --network host "$BASE_IMAGE" true || true
                     fail "podman cannot start a container here"; }
else
  read -r -a RUN_OPTS <<<"$PODMAN_RUN_OPTS"
fi
log "podman run/build options: ${RUN_OPTS[*]:-(defaults)}"
export PODMAN_RUN_OPTS="${RUN_OPTS[*]}"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# pip on this machine may take torch from a folder of wheels (find-links); the build cannot see the host's disk, so
# that folder is mounted read-only into the build's RUN steps and named to pip by PIP_FIND_LINKS.
wheel_dir=""
for d in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true) /opt/wheels; do
  if compgen -G "$d/torch-2.13.0+cpu-*.whl" >/dev/null; then wheel_dir="$d"; break; fi
done
if [ -n "$wheel_dir" ]; then
  log "torch 2.13.0+cpu from the local wheel in $wheel_dir"
  build_args+=(-v "$wheel_dir:/opt/host-wheels:ro" --build-arg PIP_FIND_LINKS=/opt/host-wheels
               --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
else
  log "no local torch wheel: torch 2.13.0+cpu from the PyTorch CPU index (Dockerfile default)"
fi
# pip here may trust a CA that the image's certificates lack (a TLS-intercepting proxy): hand its bundle to pip too.
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -n "$ca" ] && [ -f "$ca" ]; then
  log "pip's CA bundle for the build: $ca"
  build_args+=(-v "$ca:/opt/host-ca.crt:ro" --build-arg PIP_CERT=/opt/host-ca.crt)
fi
if [ "${HER_SKIP_BUILD:-0}" = 1 ] && "${PODMAN[@]}" image exists "$IMAGE"; then
  log "HER_SKIP_BUILD=1: reusing $IMAGE"
else
  log "building $IMAGE (log: $WORK/build.log)"
  t0=$(date +%s)
  # --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
  if ! locked "${PODMAN[@]}" build "${RUN_OPTS[@]}" --format docker --network host --layers \
      -f "$ROOT/docker/Dockerfile.cpu" -t "$IMAGE" "${build_args[@]}" "$CONTEXT" >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    fail "podman build failed: see $WORK/build.log"
  fi
  t_lock=$(cat "$WORK/.lock-acquired")
  log "built $IMAGE in $(($(date +%s) - t_lock)) s (+ $((t_lock - t0)) s waiting for the lock)"
  if [ "$PRUNE" = 1 ]; then
    "${PODMAN[@]}" image prune -f >/dev/null || true
  fi
fi
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((size / 1024 / 1024)) MiB"

# ---- 4. ----
locked bash "$0" --smoke
