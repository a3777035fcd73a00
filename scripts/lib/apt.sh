# Sourced by the set-up scripts: install the Debian packages of a list that are missing, in one apt run.
# The caller defines say and die.  Usage: apt_ensure LOG_FILE PACKAGE...
# Leaves what it installed in APT_INSTALLED (services a run installs are the run's to disable).
apt_ensure() {
  local log="$1"; shift
  local p
  APT_INSTALLED=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || APT_INSTALLED+=("$p")
  done
  [ "${#APT_INSTALLED[@]}" -gt 0 ] || return 0
  say "installing ${APT_INSTALLED[*]} (apt)"
  apt-get update -qq >"$log" 2>&1 || die "apt-get update failed (see $log): check the package mirror"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${APT_INSTALLED[@]}" >>"$log" 2>&1 \
    || die "apt-get install ${APT_INSTALLED[*]} failed (see $log)"
}
