#!/usr/bin/env bash
# Build the manager image (toolserver-manager:latest and :<version>) without a registry:
# the base is the local debootstrap image node/build.sh made, and every wheel (the project's
# own, its dependencies' and pip's) is fetched or built on the host into build/manager-wheels/,
# then `docker build --network none`. Where a registry exists, `docker build .` alone works too.
# Cached like the node image: the image is also tagged `ctx-<hash of what goes into it>` (sources,
# Dockerfile, base image, this script), and a build whose hash has an image only adds the tags.
# A build leaves no untagged image behind (the build stage is tagged while it is needed, then
# removed), and only the newest KEEP ctx images stay.
#   TSM_MANAGER_IMAGE=name:tag   image name (default toolserver-manager:latest)
#   BASE_IMAGE=...               base image (default: the tag in $TSM_STATE_DIR/node-base-tag)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
DOCKER="${DOCKER:-/usr/bin/docker}"
IMAGE="${TSM_MANAGER_IMAGE:-toolserver-manager:latest}"
WHEELS="$ROOT/build/manager-wheels"
say() { printf '\033[1m[manager-image]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[manager-image] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

if [ -z "${BASE_IMAGE:-}" ]; then
  [ -f "$STATE/node-base-tag" ] || bash "$ROOT/node/build.sh"
  BASE_IMAGE="$(cat "$STATE/node-base-tag")"
fi
"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "base image $BASE_IMAGE is missing (run node/build.sh)"

PY=python3
for cand in "${TSM_VENV:-}" "$ROOT/.venv"; do
  [ -n "$cand" ] && [ -x "$cand/bin/python" ] && { PY="$cand/bin/python"; break; }
done
VERSION="$("$PY" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$ROOT/pyproject.toml")"
REPO="${IMAGE%:*}"
KEEP=3  # ctx images kept: work trees (or runs) on different sources do not rebuild each other's away

# the packages that go into the wheel: every top-level package but the tests' and the node's
PKG_DIRS=()
for d in "$ROOT"/*/; do
  d="${d%/}"
  [ -f "$d/__init__.py" ] || continue
  case "$(basename "$d")" in tests|benchmarks|node|build) continue ;; esac
  PKG_DIRS+=("$d")
done

# --- the cache: what goes into the image, hashed (file names and contents, not mtimes) -----------
# the packages are those .dockerignore lets into the context (the wheel takes no other)
mapfile -t CTX_DIRS < <(sed -n 's|^!\([A-Za-z0-9_]*\)/$|\1|p' "$ROOT/.dockerignore")
ctx_hash="$(cd "$ROOT" && {
  find "${CTX_DIRS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  sha256sum pyproject.toml README.md Dockerfile .dockerignore scripts/build-manager-image.sh scripts/console-assets.sh
  "$DOCKER" image inspect --format '{{.Id}}' "$BASE_IMAGE"
} | sha256sum | cut -c1-12)"
HASH_TAG="$REPO:ctx-$ctx_hash"

tag_and_trim() {
  "$DOCKER" tag "$HASH_TAG" "$IMAGE"
  "$DOCKER" tag "$HASH_TAG" "$REPO:$VERSION"
  # older ctx images beyond the newest KEEP: untagged, so removed unless a run still tags them
  # otherwise (then they go with that tag, never left untagged)
  "$DOCKER" images --format '{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}' "$REPO" | grep -P '\t[^:]+:ctx-' | sort -r \
    | cut -f2 | grep -vx "$HASH_TAG" | tail -n +"$KEEP" | xargs -r "$DOCKER" rmi >/dev/null 2>&1 || true
  "$DOCKER" image inspect "$IMAGE" --format '{{.Size}}' | awk -v i="$IMAGE" '{ printf "%s %.0f MB\n", i, $1/1e6 }' >&2
  echo "$IMAGE"
}

if "$DOCKER" image inspect "$HASH_TAG" >/dev/null 2>&1; then
  say "$IMAGE is $HASH_TAG (cached: nothing that goes into it changed)"
  tag_and_trim
  exit 0
fi

# one build at a time on this machine: build/ is per tree but the engine and the tags are shared,
# and two builds of one hash would leave one of the two images untagged
mkdir -p "$STATE"
exec 8>"$STATE/manager-image.lock"
flock 8
if "$DOCKER" image inspect "$HASH_TAG" >/dev/null 2>&1; then
  say "$IMAGE is $HASH_TAG (built meanwhile by another run)"
  tag_and_trim
  exit 0
fi

# --- the project's wheel, built from a clean copy of the sources -----------------------------
# (building in the tree would reuse a stale build/lib, and other work may be in progress there)
mkdir -p "$WHEELS"
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$SRC/"
cp -r "${PKG_DIRS[@]}" "$SRC/"
find "$SRC" -name '__pycache__' -prune -exec rm -rf {} +
rm -f "$WHEELS"/toolserver_manager-*.whl
say "building the toolserver-manager $VERSION wheel"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$WHEELS" "$SRC" >"$STATE/manager-wheel.log" 2>&1 \
  || die "pip wheel of the project failed (see $STATE/manager-wheel.log)"
PROJECT_WHL="$(ls "$WHEELS"/toolserver_manager-*.whl | head -n1)"

# --- dependency wheels for the image's Python (manylinux x86_64), cached by pyproject -----------
# the exact version matters: markers such as python_full_version < "3.11.3" (redis) pick wheels
PYVER="$("$DOCKER" run --rm --network none --label toolserver-manager.manager_id=image-build \
  --label toolserver-manager.role=build "$BASE_IMAGE" python3 -c 'import platform; print(platform.python_version())')" \
  || die "cannot run python3 in $BASE_IMAGE"
# pip download evaluates environment markers with the host's interpreter, not --python-version:
# add what the image's older patch release needs on top (redis: async-timeout before 3.11.3)
MARKER_DEPS=""
"$PY" -c 'import sys; v=tuple(map(int, sys.argv[1].split(".")[:3])); sys.exit(0 if v < (3, 11, 3) else 1)' "$PYVER" \
  && MARKER_DEPS="async-timeout>=4.0.3"
deps_hash="$( { cat "$ROOT/pyproject.toml"; echo "$PYVER $MARKER_DEPS"; } | sha256sum | cut -c1-16)"
if [ "$(cat "$WHEELS/.deps" 2>/dev/null)" != "$deps_hash" ]; then
  say "downloading dependency wheels for python $PYVER"
  find "$WHEELS" -name '*.whl' ! -name 'toolserver_manager-*' -delete
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp \
      --python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 -d "$WHEELS" pip "$PROJECT_WHL" $MARKER_DEPS >"$STATE/manager-wheels.log" 2>&1 \
    || die "pip download of the manager's wheels failed (see $STATE/manager-wheels.log)"
  echo "$deps_hash" >"$WHEELS/.deps"
fi

# --- the console's npm libraries, served under /ui/vendor/ (admin.console_assets_dir) ----------
ASSETS="$(bash "$ROOT/scripts/console-assets.sh")" || die "the console's assets could not be installed"
rm -rf "$ROOT/build/console-assets"
mkdir -p "$ROOT/build/console-assets"
(cd "$ASSETS" && cp --parents node_modules/@xterm/xterm/lib/xterm.mjs node_modules/@xterm/xterm/css/xterm.css \
   node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css "$ROOT/build/console-assets/")

# --- the image ---------------------------------------------------------------------------------
# The build stage is built and tagged first, so that it can be removed by name afterwards: the
# legacy builder leaves a multi-stage build's earlier stages as untagged images (~265 MB each).
say "building $IMAGE (base $BASE_IMAGE)"
BUILD_TAG="$REPO:build-$ctx_hash"
build() {
  "$DOCKER" build --network none --build-arg BASE_IMAGE="$BASE_IMAGE" \
      --label "toolserver-manager.image=manager" --label "toolserver-manager.ctx=$ctx_hash" "$@" "$ROOT" \
      >>"$STATE/manager-image.log" 2>&1 \
    || { "$DOCKER" rmi "$BUILD_TAG" >/dev/null 2>&1 || true
         tail -n 30 "$STATE/manager-image.log" >&2; die "docker build failed (see $STATE/manager-image.log)"; }
}
: >"$STATE/manager-image.log"
build --target build -t "$BUILD_TAG"
build -t "$HASH_TAG"
"$DOCKER" rmi "$BUILD_TAG" >/dev/null
tag_and_trim
