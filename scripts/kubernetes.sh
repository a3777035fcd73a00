#!/usr/bin/env bash
# Build a real Kubernetes v1.20.2 for the live chart tests (tests/test_kubernetes.py), offline:
# no registry serves a Kubernetes server here, but Debian 12's source package `kubernetes` is the
# whole v1.20.2 tree with its vendored modules. Builds kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet (dockershim: it drives a Docker engine) and kube-proxy with Debian's Go,
# with the two patches in scripts/kubernetes/, plus the pause binary from its C source.
# Cached by recipe under the state dir (like node/build.sh's base image): only the first run pays
# (about 6 min on 2 cores). Prints the directory holding bin/ and pause.tar. Called by setup.sh --test.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
DOCKER="${DOCKER:-/usr/bin/docker}"
say() { printf '\033[1m[kubernetes]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[kubernetes] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
. "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

SUITE=bookworm
WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy"
# the build; etcd; dnsmasq answers the test cluster's Service names (tests/test_kubernetes.py: no CoreDNS here)
PKGS=(golang-go rsync jq etcd-server gcc libc6-dev patch dpkg-dev dnsmasq-base iptables)
BASE="$STATE/kubernetes"
mkdir -p "$BASE"

apt_ensure "$BASE/apt.log" "${PKGS[@]}"

# the recipe: what is built, from which source, with which patches and which Go
RECIPE="$SUITE kubernetes source | $WHAT | CGO_ENABLED=0 | $(go version) | $(cat "$HERE"/kubernetes/*.patch | sha256sum) | v1"
OUT="$BASE/build-$(echo "$RECIPE" | sha256sum | cut -c1-12)"

if [ ! -f "$OUT/.done" ]; then
  rm -rf "$OUT"; mkdir -p "$OUT"
  # the deb-src entry lives in private dirs: the system's apt sources and lists stay untouched
  APTDIR="$BASE/apt"; rm -rf "$APTDIR"; mkdir -p "$APTDIR/sources.list.d" "$APTDIR/lists/partial" "$APTDIR/src"
  MIRROR=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' | grep -v -- -security | head -1)
  [ -n "$MIRROR" ] || die "no Debian mirror configured for apt (run apt-get update)"
  cat >"$APTDIR/sources.list.d/src.sources" <<EOF
Types: deb-src
URIs: $MIRROR
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  APTO=(-o "Dir::Etc::SourceParts=$APTDIR/sources.list.d" -o Dir::Etc::SourceList=/dev/null -o "Dir::State::Lists=$APTDIR/lists")
  say "downloading Debian's kubernetes source package (34 MB)"
  apt-get "${APTO[@]}" update -qq >"$OUT/apt-src.log" 2>&1 || die "apt-get update of the deb-src entry failed (see $OUT/apt-src.log)"
  (cd "$APTDIR/src" && apt-get "${APTO[@]}" source --download-only kubernetes) >>"$OUT/apt-src.log" 2>&1 \
    || die "apt-get source kubernetes failed (see $OUT/apt-src.log)"
  # Kubernetes' make wants the tree inside a GOPATH (as Debian's rules arrange it)
  GOPATH_DIR="$BASE/gopath"; TREE="$GOPATH_DIR/src/k8s.io/kubernetes"
  rm -rf "$GOPATH_DIR"; mkdir -p "$(dirname "$TREE")"
  dpkg-source -q -x --no-check "$APTDIR"/src/kubernetes_*.dsc "$TREE" >>"$OUT/apt-src.log" 2>&1 \
    || die "dpkg-source -x failed (see $OUT/apt-src.log)"
  for p in "$HERE"/kubernetes/*.patch; do
    patch -s -d "$TREE" -p1 <"$p" || die "patch $(basename "$p") does not apply"
  done
  # the Go build cache outlives the tree, so a changed recipe rebuilds in about 30 s
  mkdir -p "$BASE/go-cache" "$TREE/_output/local/go"
  ln -sfn "$BASE/go-cache" "$TREE/_output/local/go/cache"
  say "building $WHAT (about 6 min on 2 cores, once; log: $OUT/make.log)"
  (cd "$TREE" && GOPATH="$GOPATH_DIR" CGO_ENABLED=0 nice make WHAT="$WHAT") >"$OUT/make.log" 2>&1 \
    || die "make of the Kubernetes servers failed (see $OUT/make.log)"
  mkdir -p "$OUT/bin"
  for b in $WHAT; do cp "$TREE/_output/local/bin/linux/amd64/$(basename "$b")" "$OUT/bin/" || die "no $(basename "$b") built"; done
  # the pod sandbox image: pause from its C source, static, as the only file of an image
  mkdir -p "$OUT/pause"
  gcc -Os -static -o "$OUT/pause/pause" "$TREE/build/pause/linux/pause.c" || die "gcc of pause.c failed"
  tar -C "$OUT/pause" -cf "$OUT/pause.tar" pause
  rm -rf "$GOPATH_DIR" "$APTDIR" "$OUT/pause"
  touch "$OUT/.done"
  say "built into $OUT"
fi
# Redis for the chart's bundled mode: no registry here, so Debian's redis-server in a local image on
# the node's debootstrap base (apt inside the build reaches the mirror), tagged by its recipe
BASE_TAG="$(cat "$STATE/node-base-tag" 2>/dev/null)" || die "no node base image yet (run node/build.sh first)"
REDIS_RECIPE="$BASE_TAG redis-server v1"
REDIS_TAG="toolserver-redis:$(echo "$REDIS_RECIPE" | sha256sum | cut -c1-12)"
if ! "$DOCKER" image inspect "$REDIS_TAG" >/dev/null 2>&1; then
  say "building $REDIS_TAG from Debian's redis-server"
  printf '%s\n' "FROM $BASE_TAG" \
    "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*" \
    'ENTRYPOINT ["redis-server"]' \
    | "$DOCKER" build -q --label toolserver-manager.role=build -t "$REDIS_TAG" - >"$BASE/redis-image.log" 2>&1 \
    || die "docker build of $REDIS_TAG failed (see $BASE/redis-image.log)"
fi
echo "$REDIS_TAG" >"$STATE/kubernetes-redis-image"

# earlier recipes' builds
find "$BASE" -maxdepth 1 -name 'build-*' ! -path "$OUT" -exec rm -rf {} + 2>/dev/null || true
echo "$OUT" >"$STATE/kubernetes-build"
echo "$OUT"
