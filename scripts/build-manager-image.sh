#!/usr/bin/env bash
# Build the manager image (toolserver-manager:latest and :<version>) without a registry:
# the base is the local debootstrap image node/build.sh made, and every wheel (the project's
# own, its dependencies' and pip's) is fetched or built on the host into build/manager-wheels/,
# then `docker build --network none`. Where a registry exists, `docker build .` alone works too.
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

# --- the project's wheel, built from a clean copy of the sources -----------------------------
# (building in the tree would reuse a stale build/lib, and other work may be in progress there)
mkdir -p "$WHEELS"
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$SRC/"
for d in "$ROOT"/*/; do
  d="${d%/}"
  [ -f "$d/__init__.py" ] || continue
  case "$(basename "$d")" in tests|benchmarks|node|build) continue ;; esac
  cp -r "$d" "$SRC/"
done
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
say "building $IMAGE (base $BASE_IMAGE)"
"$DOCKER" build --network none --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -t "$IMAGE" -t "${IMAGE%:*}:$VERSION" "$ROOT" >"$STATE/manager-image.log" 2>&1 \
  || { tail -n 30 "$STATE/manager-image.log" >&2; die "docker build failed (see $STATE/manager-image.log)"; }
"$DOCKER" image inspect "$IMAGE" --format '{{.Size}}' | awk -v i="$IMAGE" '{ printf "%s %.0f MB\n", i, $1/1e6 }' >&2
echo "$IMAGE"
