#!/bin/sh
# Start the node's server as uid 1001 ("server", group 1000) holding only what it needs to start
# tools as uid 1000 ("node") and to end them: setuid, setgid, kill, plus dac_override and fowner
# for workspace files tools made before tools had a uid of their own. A tool (uid 1000, no
# capabilities) can then neither ptrace, signal nor read the environment of the server, which
# holds the node secret. umask 002 and the shared group keep the workspace writable by both.
# Where capabilities cannot be ambient (gVisor: exec drops them for any uid but root), the server
# starts as root and drops to 1001 itself before anything else (app/privileges.py), and starts
# tools by switching uid between fork and exec (app/procs.py).
# Started as another user than root (creation_kwargs.user, e.g. "1000:1000"): the server runs as
# it is and tools share its uid. As root without those capabilities: refused, never root.
set -eu
umask 002
CAPS=+setuid,+setgid,+kill,+dac_override,+fowner
run_as_server() {
  setpriv --reuid=1001 --regid=1000 --clear-groups --inh-caps="$CAPS" --ambient-caps="$CAPS" -- "$@"
}
share_workspace() {
  ws="${NODE_WORKSPACE:-/app/workspace}"
  # the workspace's root: group-writable, new entries in the shared group (a volume keeps this)
  chgrp 1000 "$ws" 2>/dev/null || true
  chmod 2775 "$ws" 2>/dev/null || true
  export NODE_TOOL_UID=1000 NODE_TOOL_GID=1000
}
# the server's ambient capabilities must let it start a tool as 1000 (not so under gVisor)
if [ "$(id -u)" = 0 ] && run_as_server setpriv --reuid=1000 --regid=1000 --clear-groups true 2>/dev/null; then
  share_workspace
  exec setpriv --reuid=1001 --regid=1000 --clear-groups --inh-caps="$CAPS" --ambient-caps="$CAPS" -- "$@"
fi
if [ "$(id -u)" = 0 ] && [ "$*" = "python3 -m app" ] && run_as_server true 2>/dev/null; then
  share_workspace
  export NODE_SERVER_UID=1001 NODE_SERVER_GID=1000 NODE_TOOL_SWITCH=fork
  exec "$@"
fi
if [ "$(id -u)" = 0 ]; then
  # never the server as root: say what is missing and stop (the manager reports the exit)
  echo "node: started as root without the capabilities to split uids (setuid, setgid, kill," \
       "dac_override, fowner): add them (creation_kwargs.cap_add) or start the node as user 1000:1000" >&2
  exit 1
fi
exec "$@"
