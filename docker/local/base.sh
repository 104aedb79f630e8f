#!/bin/sh
# A Debian bookworm base image made on this host, for hosts that reach no image registry:
# `debootstrap --variant=minbase` from the Debian mirror apt is configured with, then
# `docker import`. The platform, PostgreSQL, S3 stand-in and Triton images of `make images-local`
# are built FROM it (build arg BASE_IMAGE); production builds keep the public bases.
#
#   docker/local/base.sh [TAG]        # default local/debian:bookworm; rebuilds only when missing
#   FER_BASE_REBUILD=1 docker/local/base.sh
set -eu
TAG="${1:-local/debian:bookworm}"
SUITE="${FER_BASE_SUITE:-bookworm}"
if [ -z "${FER_BASE_REBUILD:-}" ] && docker image inspect "$TAG" > /dev/null 2>&1; then
  echo "base: $TAG exists"
  exit 0
fi
# The mirror apt uses here (deb822 sources first, then the classic list).
MIRROR="${FER_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)}"
[ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
root=$(mktemp -d /tmp/fer-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" > "$root.log" 2>&1 \
  || { tail -n 20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# Security updates too, as the public debian images have them.
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
  "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "${MIRROR%/debian}/debian-security" "$SUITE" \
  > "$root/etc/apt/sources.list"
# No apt lists, caches or logs of this host in the image.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/var/log/* "$root"/tmp/*
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$TAG" > /dev/null
echo "base: $TAG $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
