#!/usr/bin/env bash
# Put the workspace images' directory (node.disk.image_dir) on a file system with reflinks, so that a
# fork's and a snapshot's copies of a workspace image are clones (FICLONE: shared extents, no bytes
# copied) instead of sparse copies: `bash scripts/images-fs.sh <dir>`. Idempotent:
#   - <dir> already on a file system with reflinks (XFS with reflink=1, btrfs, or this script's own
#     mount): nothing to do;
#   - else, when <dir> holds no file: a sparse XFS image (mkfs.xfs -m reflink=1) loop-mounted at <dir>,
#     made once and mounted again by later runs (after a reboot, say);
#   - else (images of sessions in it): left as it is, said so, exit 2. Mounting over them would hide
#     images that loop devices and volumes still name: move the sessions off first (release them).
# Environment: TSM_IMAGES_FS_FILE, the XFS image (default /var/lib/tsm-images.xfs, outside the state
# dir, whose loop-backed files the test suite's machine check counts as workspace leftovers);
# TSM_IMAGES_FS_BYTES, its size (default 64 GiB, at most 90 % of what its file system has free: it
# is sparse, and an XFS whose image cannot grow fails its writes). Exit 0 when <dir> has reflinks.
set -euo pipefail

dir="${1:?usage: images-fs.sh <dir>}"
file="${TSM_IMAGES_FS_FILE:-/var/lib/tsm-images.xfs}"
say() { printf '\033[1m[images-fs]\033[0m %s\n' "$*"; }

mkdir -p "$dir"
chmod 700 "$dir"

# a clone of a small file in <dir> works only where the file system has reflinks
reflinks() {
  local probe
  probe="$(mktemp -p "$1" .reflink-probe.XXXXXX)"
  head -c 4096 /dev/zero >"$probe"
  if cp --reflink=always "$probe" "$probe.clone" 2>/dev/null; then rm -f "$probe" "$probe.clone"; return 0; fi
  rm -f "$probe" "$probe.clone"
  return 1
}

if reflinks "$dir"; then
  exit 0
fi
if [ -n "$(find "$dir" -mindepth 1 -type f -print -quit)" ]; then
  say "$dir holds files and has no reflinks: left on $(findmnt -n -o FSTYPE -T "$dir"); forks and snapshots copy bytes there. Release its sessions and run this again to put it on XFS"
  exit 2
fi
command -v mkfs.xfs >/dev/null || { say "mkfs.xfs is missing (apt-get install xfsprogs)"; exit 1; }

if [ ! -f "$file" ]; then
  size="${TSM_IMAGES_FS_BYTES:-}"
  if [ -z "$size" ]; then
    mkdir -p "$(dirname "$file")"
    free=$(( $(df --output=avail -B1 "$(dirname "$file")" | tail -1) * 9 / 10 ))
    size=$(( 64 << 30 )); [ "$free" -lt "$size" ] && size="$free"
  fi
  say "making a sparse XFS of $((size >> 30)) GiB with reflinks at $file for $dir"
  (umask 077; truncate -s "$size" "$file.part")
  mkfs.xfs -q -f -m reflink=1,crc=1 "$file.part"
  mv "$file.part" "$file"
fi

# mounted from a shell whose working directory is <dir> itself: "." stays the directory beneath the
# mount, so an image someone made there between the check above and the mount is seen, and the
# mount is taken back rather than hide it. discard: an image deleted in the XFS gives its blocks
# back to the file system beneath (holes punched in the sparse image)
(
  cd "$dir"
  mount -o loop,discard,noatime "$file" "$dir"
  if [ -n "$(find . -mindepth 1 -type f -print -quit)" ]; then
    umount "$dir" || umount -l "$dir"
    say "$dir received files while it was being mounted: left as it was; run this again"
    exit 2
  fi
)
chmod 700 "$dir"
reflinks "$dir" || { say "$dir is mounted from $file but clones fail there"; exit 1; }
say "$dir is on XFS with reflinks ($file)"
