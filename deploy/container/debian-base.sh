#!/bin/sh
# Build the container's base image from Debian's own packages, no registry needed:
# debootstrap a minimal Debian bookworm root filesystem from the Debian mirror and import it
# into podman as $BASE_IMAGE (default localhost/debian-base:bookworm).
#   deploy/container/debian-base.sh [image-name]
# Needs root (debootstrap), debootstrap and podman (apt-get install debootstrap podman).
# The root filesystem is built in a temporary folder and removed; nothing lands in the clone.
set -eu
IMAGE=${1:-${BASE_IMAGE:-localhost/debian-base:bookworm}}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$IMAGE"; then
    echo "$IMAGE exists (podman rmi $IMAGE to rebuild it)"
    exit 0
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 || {
        echo "$tool is missing: apt-get install debootstrap podman" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root: run as root or with sudo" >&2; exit 1; }

work=$(mktemp -d /tmp/debian-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
PATH="$PATH:/usr/sbin" debootstrap --variant=minbase "$SUITE" "$work/rootfs" "$MIRROR" >"$work/log" 2>&1 || {
    tail -20 "$work/log" >&2; echo "debootstrap failed (log above)" >&2; exit 1; }
# what the official debian images also leave out: package lists and caches
rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin \
       "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/log/"*.log
tar --numeric-owner -C "$work/rootfs" -c . | podman import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$IMAGE"
echo "imported $IMAGE"
