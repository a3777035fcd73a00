#!/usr/bin/env bash
# Bring up the real parts on a Debian machine as root: packages, Redis, dockerd,
# the project's virtualenv and the node image. Idempotent: a second run takes seconds.
# Sourced by scripts/run.sh and scripts/test.sh; usable alone: `bash scripts/setup.sh [--test]`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"   # logs, caches; survives fresh clones
VENV="${TSM_VENV:-$ROOT/.venv}"
WITH_TEST="${TSM_WITH_TEST:-0}"
[ "${1:-}" = "--test" ] && WITH_TEST=1
mkdir -p "$STATE"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
. "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

[ "$(id -u)" = 0 ] || die "run as root (apt-get and dockerd need it)"

# --- Debian packages -------------------------------------------------------
# xfsprogs: the workspace images' directory on XFS with reflinks (scripts/images-fs.sh)
APT_PKGS=(docker.io redis-server debootstrap iptables nftables xfsprogs)
# what the test suite starts for real: a load balancer, Prometheus, a proxy to compare with
[ "$WITH_TEST" = 1 ] && APT_PKGS+=(haproxy prometheus)
# the multi-host test: hosts as network namespaces (ip netns, veth, bridge; nsenter)
[ "$WITH_TEST" = 1 ] && APT_PKGS+=(iproute2 util-linux)
# gVisor, for the test of engine.docker.runtime (registered only with the test's private engine, never the machine's)
[ "$WITH_TEST" = 1 ] && APT_PKGS+=(runsc)
# Redis Sentinel, for the failover test (a primary, a replica and three sentinels of the test's own)
[ "$WITH_TEST" = 1 ] && APT_PKGS+=(redis-sentinel)
# an image registry on 127.0.0.1, for the test of pulling a missing node image
[ "$WITH_TEST" = 1 ] && APT_PKGS+=(docker-registry)
# nginx, the proxy benchmarks' yardstick (benchmarks/proxy_throughput.py runs its own, -c in a temp dir)
[ "$WITH_TEST" = 1 ] && APT_PKGS+=(nginx-light)
# the console's tests drive Debian's Chromium headless (through Playwright, never its own browsers)
[ "$WITH_TEST" = 1 ] && APT_PKGS+=(chromium)
# the console's two libraries and helm come from npm; Debian's npm when the machine has none
command -v npm >/dev/null || APT_PKGS+=(npm)
# Debian's python3 has no venv module until python3-venv is installed
python3 -c 'import ensurepip, venv' 2>/dev/null || APT_PKGS+=(python3-venv)
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11 or newer is needed (found $(python3 --version 2>&1))"
apt_ensure "$STATE/apt.log" "${APT_PKGS[@]}"
# the tests run their own registry on 127.0.0.1; Debian's package would serve one on every address
# (and its own sentinels: the packaged one would watch the machine's Redis on every boot). Only
# the services this run just installed: one the machine had before is its owner's to run
if [ "$WITH_TEST" = 1 ] && command -v systemctl >/dev/null; then
  for svc in docker-registry redis-sentinel; do
    case " ${APT_INSTALLED[*]} " in *" $svc "*) systemctl disable --now "$svc" >/dev/null 2>&1 || true ;; esac
  done
fi
# Debian's nginx starts a server on :80 at install (through its init script where PID 1 is not systemd)
case " ${APT_INSTALLED[*]} " in *" nginx-light "*)
  { systemctl disable --now nginx || { /etc/init.d/nginx stop; update-rc.d nginx disable; }; } >/dev/null 2>&1 || true ;;
esac

# --- Redis and the Docker engine ---------------------------------------------
bash "$ROOT/scripts/services.sh" start-redis
bash "$ROOT/scripts/services.sh" start-dockerd
DOCKER=/usr/bin/docker

# --- workspace images on a file system with reflinks ---------------------------
# forks and snapshots clone a workspace image there (no bytes copied) where ext4 copies it; the
# directory is node.disk.image_dir (TSM_NODE__DISK__IMAGE_DIR when the config says another).
# TSM_IMAGES_FS=0 leaves it as it is. Sessions' images already in it keep it as it is (said so)
if [ "${TSM_IMAGES_FS:-1}" != 0 ]; then
  rc=0; bash "$ROOT/scripts/images-fs.sh" "${TSM_NODE__DISK__IMAGE_DIR:-/var/lib/toolserver-manager/workspaces}" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 2 ] || die "the workspace images' file system could not be set up (see above)"
fi

# --- Python virtualenv -------------------------------------------------------
stamp="$VENV/.tsm-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$WITH_TEST"
have="$(cat "$stamp" 2>/dev/null || true)"
# an install with the test extras serves the service too: the service's set-up (scripts/run.sh, which
# test_run_command runs in this tree's venv) must not rewrite the stamp and make the next test run
# install all over again
if [ "$have" != "$want" ] && ! { [ "$WITH_TEST" = 0 ] && [ "$have" = "${want%-0}-1" ]; }; then
  say "installing the Python package into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
  extra=""; [ "$WITH_TEST" = 1 ] && extra="[test,bench]"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT$extra" >"$STATE/pip.log" 2>&1 \
    || die "pip install failed (see $STATE/pip.log)"
  echo "$want" >"$stamp"
fi

# --- node image --------------------------------------------------------------
bash "$ROOT/node/build.sh"

# --- the operator console's libraries (xterm.js, uPlot), served by the manager under /ui/ ---
bash "$ROOT/scripts/console-assets.sh" >/dev/null || die "the console's assets could not be installed (see above)"

# --- a real Kubernetes (v1.20.2 from Debian's source package) for the chart's live tests --------
# built once (about 6 min on 2 cores), then cached by recipe under $STATE/kubernetes
if [ "$WITH_TEST" = 1 ]; then
  bash "$ROOT/scripts/kubernetes.sh" >/dev/null || die "the Kubernetes servers could not be built (see above)"
fi

# --- helm, for the chart tests -------------------------------------------------
if [ "$WITH_TEST" = 1 ]; then
  bash "$ROOT/scripts/install-helm.sh" >/dev/null || die "helm could not be installed (see above)"
fi
