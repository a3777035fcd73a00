#!/usr/bin/env bash
# Register gVisor's runsc with the local dockerd as the runtime "runsc" (engine.docker.runtime: runsc).
# Debian bookworm's runsc (2022) cannot build its own network stack inside Docker's network
# namespace ("cannot run with network enabled in root network namespace"), so it runs with
# --network=host: gVisor then uses the container's own namespace (the node network, the
# firewall chains) while system calls still go to gVisor's kernel. Merges into
# /etc/docker/daemon.json and reloads dockerd with SIGHUP (containers keep running).
set -euo pipefail
command -v runsc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends runsc >/dev/null
CONF=/etc/docker/daemon.json
mkdir -p /etc/docker
python3 - "$CONF" "$(command -v runsc)" <<'PY'
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
conf = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
conf.setdefault("runtimes", {})["runsc"] = {"path": runsc, "runtimeArgs": ["--network=host"]}
tmp = path + ".tmp"
json.dump(conf, open(tmp, "w"), indent=2)
os.replace(tmp, path)
PY
pid=$(cat /var/run/docker.pid 2>/dev/null || true)  # the default engine, not a second one
[ -n "$pid" ] && kill -HUP "$pid"
for _ in $(seq 50); do /usr/bin/docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && exit 0; sleep 0.1; done
echo "runsc registered in $CONF; start dockerd to use it" >&2
