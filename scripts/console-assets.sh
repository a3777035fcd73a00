#!/usr/bin/env bash
# Install the operator console's two front-end libraries from npm into a cache directory and
# print it (the only thing on stdout); the manager serves them under /ui/vendor/ from there
# (admin.console_assets_dir). Pinned versions; idempotent: a second run only checks.
#   TSM_CONSOLE_ASSETS=dir   cache directory (default: $TSM_STATE_DIR/console-assets)
set -euo pipefail

PKGS=("@xterm/xterm@6.0.0" "uplot@1.6.32")
FILES=(node_modules/@xterm/xterm/lib/xterm.mjs node_modules/@xterm/xterm/css/xterm.css
       node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css)
say() { printf '\033[1m[console]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[console] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
DIR="${TSM_CONSOLE_ASSETS:-$STATE/console-assets}"
stamp="$DIR/.installed"
want="${PKGS[*]}"

complete() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] || return 1
  for f in "${FILES[@]}"; do [ -s "$DIR/$f" ] || return 1; done
}

if ! complete; then
  command -v npm >/dev/null || die "npm is not installed (apt-get install npm)"
  say "installing ${PKGS[*]} into $DIR (npm, a few seconds)"
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"  # parallel set-ups do not install over each other
  flock 9 2>/dev/null || true
  if ! complete; then
    npm install --prefix "$DIR" --no-audit --no-fund --no-save --ignore-scripts --loglevel=error "${PKGS[@]}" \
      >"$DIR/npm.log" 2>&1 || die "npm install ${PKGS[*]} failed (see $DIR/npm.log)"
    for f in "${FILES[@]}"; do [ -s "$DIR/$f" ] || die "$DIR/$f is missing after npm install (see $DIR/npm.log)"; done
    echo "$want" >"$stamp"
  fi
fi
echo "$DIR"
