#!/usr/bin/env bash
# Make sure a Docker daemon answers, for the sshd testbed (python -m testbed, pytest -m integration).
#
# Idempotent: installs docker.io, debootstrap, openssh-client and rsync (the benchmarks compare rx's project
# sync with it) only when missing, starts dockerd only
# when none runs, then waits up to 60 s for `docker info`. Exit 0 when Docker answers, 1 otherwise.
#
# The daemon is what is checked, not the client: some images ship a docker CLI (/usr/local/bin/docker)
# without dockerd, and a check for `docker` alone would never install the engine.
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
WAIT_SECONDS=${DOCKER_WAIT_SECONDS:-60}

log() { echo "ensure-docker: $*" >&2; }

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

docker_ok() { have docker && timeout 10 docker info >/dev/null 2>&1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

missing=()
have dockerd || missing+=(docker.io)
have debootstrap || missing+=(debootstrap)
have ssh || missing+=(openssh-client)
have rsync || missing+=(rsync)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root timeout 300 apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if docker_ok; then
    log "docker answers"
    exit 0
fi

if pgrep -x dockerd >/dev/null 2>&1; then
    log "dockerd is already running; waiting for it to answer"
else
    # A pid file left by a daemon that died would stop the new one from starting.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        as_root rm -f /var/run/docker.pid
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    as_root sh -c "nohup setsid dockerd >'$DOCKERD_LOG' 2>&1 </dev/null &"
fi

deadline=$((SECONDS + WAIT_SECONDS))
while [ "$SECONDS" -lt "$deadline" ]; do
    if docker_ok; then
        log "docker answers"
        exit 0
    fi
    sleep 1
done

log "ERROR: Docker did not answer within ${WAIT_SECONDS} s; last lines of $DOCKERD_LOG:"
tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
exit 1
