#!/usr/bin/env bash
# Build the reference node image without a registry: a Debian base made by debootstrap and
# `docker import` (cached by its recipe), wheels fetched on the host, then `docker build`.
# Where a registry exists, `docker build node/` alone works too (BASE_IMAGE defaults to python).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
DOCKER="${DOCKER:-/usr/bin/docker}"
IMAGE="${TSM_NODE_IMAGE:-toolserver-node:latest}"
SUITE=bookworm
say() { printf '\033[1m[node-image]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[node-image] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
mkdir -p "$STATE"

# --- base image: debootstrap rootfs, rebuilt only when this recipe changes ---
BASE_RECIPE="debootstrap --variant=minbase --include=python3,ca-certificates $SUITE v1"
BASE_TAG="toolserver-node-base:$SUITE-$(echo "$BASE_RECIPE" | sha256sum | cut -c1-12)"
if ! "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  ROOTFS="$STATE/rootfs-$SUITE"
  rm -rf "$ROOTFS"
  MIRROR=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' | grep -v -- -security | head -1)
  [ -n "$MIRROR" ] || die "no Debian mirror configured for apt (run apt-get update)"
  say "debootstrap $SUITE into $ROOTFS (about a minute, once)"
  debootstrap --variant=minbase --include=python3,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" 2>&1 \
    | grep --line-buffered -E '^I: (Retrieving|Extracting|Installing|Configuring|Base system)' \
    | awk '{ n++; if (n % 25 == 1 || /Base system/) { print "  " $0; fflush() } }' || true
  [ -x "$ROOTFS/usr/bin/python3" ] || die "debootstrap failed: no python3 in $ROOTFS"
  say "importing the rootfs as $BASE_TAG"
  tar -C "$ROOTFS" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
      --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -c . | "$DOCKER" import - "$BASE_TAG" >/dev/null
  rm -rf "$ROOTFS"
fi

# --- wheels for the image's Python (3.11), fetched on the host ---------------
req_hash=$(sha256sum "$HERE/requirements.txt" | cut -c1-12)
WHEELS="$STATE/node-wheels-$req_hash"
if [ ! -f "$WHEELS/.done" ]; then
  say "downloading node wheels"
  rm -rf "$WHEELS"; mkdir -p "$WHEELS"
  PY=python3; [ -x "${TSM_VENV:-}/bin/python" ] && PY="$TSM_VENV/bin/python"
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp --python-version 3.11 \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$WHEELS" pip -r "$HERE/requirements.txt" || die "pip download of the node's wheels failed"
  touch "$WHEELS/.done"
fi

# --- node image, tagged by the hash of its context ---------------------------
ctx_hash=$(cd "$HERE" && { cat Dockerfile requirements.txt entrypoint.sh; find app -type f -name '*.py' | sort | xargs cat; echo "$BASE_TAG"; } | sha256sum | cut -c1-12)
HASH_TAG="${IMAGE%:*}:ctx-$ctx_hash"
if ! "$DOCKER" image inspect "$HASH_TAG" >/dev/null 2>&1; then
  say "building $IMAGE"
  find "$HERE/wheels" -name '*.whl' -delete
  cp "$WHEELS"/*.whl "$HERE/wheels/"
  "$DOCKER" build --network none --build-arg BASE_IMAGE="$BASE_TAG" -t "$HASH_TAG" -t "$IMAGE" "$HERE" \
    | grep --line-buffered -E '^(Step|Successfully)' || die "docker build of the node image failed"
  find "$HERE/wheels" -name '*.whl' -delete
  "$DOCKER" image inspect "$HASH_TAG" >/dev/null 2>&1 || die "docker build of the node image failed"
fi
"$DOCKER" tag "$HASH_TAG" "$IMAGE"
# drop the tags of earlier contexts, so old images do not pile up
"$DOCKER" images --format '{{.Repository}}:{{.Tag}}' "${IMAGE%:*}" | grep ':ctx-' | grep -vx "$HASH_TAG" \
  | xargs -r "$DOCKER" rmi >/dev/null 2>&1 || true
echo "$BASE_TAG" >"$STATE/node-base-tag"
