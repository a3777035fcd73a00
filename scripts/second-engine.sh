#!/usr/bin/env bash
# A second, independent Docker engine on this machine (own socket, data root, exec root
# and bridge) for tests and benchmarks of a cluster with two manager_ids.
#   second-engine.sh start   -> prints the socket URL; loads the node image into it
#   second-engine.sh stop    -> stops it, removes its containers, its bridge and its data
set -euo pipefail
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
NAME="${TSM_ENGINE2_NAME:-tsm-engine2}"
SOCK="/run/$NAME.sock"
EXEC="/run/$NAME"
DATA="$STATE/$NAME-data"
LOG="$STATE/tsm-engine2.log"  # one for every name (test runs name theirs): the last start's
BR="${TSM_ENGINE2_BRIDGE:-tsm-br2}"
BR_ADDR="${TSM_ENGINE2_BRIDGE_ADDR:-172.30.99.1/24}"
IMAGE="${TSM_NODE_IMAGE:-toolserver-node:latest}"
D2=(/usr/bin/docker -H "unix://$SOCK")
die() { printf '\033[31m[engine2] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

start() {
  if ! "${D2[@]}" info >/dev/null 2>&1; then
    ip link show "$BR" >/dev/null 2>&1 || {
      ip link add name "$BR" type bridge
      ip addr add "$BR_ADDR" dev "$BR"
      ip link set "$BR" up
    }
    mkdir -p "$DATA" "$EXEC"
    # no iptables of its own: the first engine owns the NAT chains; docker-proxy still
    # publishes ports on 127.0.0.1, which is all the nodes need here
    nohup dockerd --host "unix://$SOCK" --data-root "$DATA" --exec-root "$EXEC" --pidfile "$EXEC.pid" \
      --bridge "$BR" --iptables=false --ip-masq=false --live-restore >"$LOG" 2>&1 &
    for _ in $(seq 150); do "${D2[@]}" info >/dev/null 2>&1 && break; sleep 0.2; done
    "${D2[@]}" info >/dev/null 2>&1 || die "second dockerd did not start (see $LOG)"
  fi
  want=$(/usr/bin/docker image inspect -f '{{.Id}}' "$IMAGE")
  have=$("${D2[@]}" image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    # through the tar testing/hosts.py keeps per image id (its engines load the same image), made once
    id16="$(echo "${want#sha256:}" | cut -c1-16)"
    tar="$STATE/image-cache/$id16.tar"
    if [ ! -f "$tar" ]; then
      mkdir -p "$STATE/image-cache"
      /usr/bin/docker save -o "$tar.part.$$" "$IMAGE" && mv "$tar.part.$$" "$tar" || die "saving $IMAGE failed"
    fi
    "${D2[@]}" load -q -i "$tar" >/dev/null || die "loading $IMAGE into the second engine failed"
    "${D2[@]}" tag "$id16" "$IMAGE"  # the tar may carry another tag of the same image
  fi
  echo "unix://$SOCK"
}

stop() {
  if "${D2[@]}" info >/dev/null 2>&1; then
    ids=$("${D2[@]}" ps -aq --filter label=toolserver-manager.manager_id)
    [ -n "$ids" ] && "${D2[@]}" rm -f $ids >/dev/null
    # bounded workspaces (a volume on a loop-attached image) and node networks go too
    for v in $("${D2[@]}" volume ls -q --filter label=toolserver-manager.manager_id); do
      img=$("${D2[@]}" volume inspect -f '{{index .Labels "toolserver-manager.image_file"}}' "$v" 2>/dev/null || true)
      "${D2[@]}" volume rm -f "$v" >/dev/null 2>&1 || true
      if [ -n "$img" ]; then
        for d in $(losetup -j "$img" | cut -d: -f1); do losetup -d "$d" || true; done
        rm -f "$img"
      fi
    done
    "${D2[@]}" network ls -q --filter label=toolserver-manager.manager_id | xargs -r "${D2[@]}" network rm >/dev/null 2>&1 || true
    pid=$(cat "$EXEC.pid" 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  ip link del "$BR" 2>/dev/null || true
  # its data goes too (the image loaded into it is loaded again at the next start, in seconds):
  # unmount what it left mounted there, deepest first, then delete
  for root in "$DATA" "$EXEC"; do
    awk -v r="$root" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r \
      | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$root"
  done
  rm -f "$SOCK" "$EXEC.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
