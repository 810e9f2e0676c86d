#!/bin/sh
# Build a Debian bookworm base image without pulling from a registry: debootstrap from the Debian mirror this
# machine's apt uses, then `docker import`. Use it where Docker Hub cannot be reached:
#
#   deploy/make-base-image.sh                      # -> image autocode-base:bookworm
#   docker compose build --build-arg BASE_IMAGE=autocode-base:bookworm   (or BASE_IMAGE=... in the env file)
#
# Environment: IMAGE (default autocode-base:bookworm), MIRROR (default: the first deb.debian.org-style URI in
# /etc/apt/sources.list(.d), else http://deb.debian.org/debian), SUITE (default bookworm). Needs root, debootstrap.
set -eu

IMAGE=${IMAGE:-autocode-base:bookworm}
SUITE=${SUITE:-bookworm}
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$( (cat /etc/apt/sources.list 2>/dev/null; cat /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null) \
        | grep -v '^#' | grep -Eo 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ')
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
command -v debootstrap >/dev/null || { echo "make-base-image: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }

ROOT=$(mktemp -d /tmp/autocode-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "make-base-image: debootstrap $SUITE from $MIRROR into $ROOT" >&2
# python3 + venv: the image's interpreter; ca-certificates: pip over HTTPS; the rest is minbase.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
# apt inside the image uses the same mirror (the Dockerfile installs a few packages with it).
echo "deb $MIRROR $SUITE main" > "$ROOT/etc/apt/sources.list"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | docker import - "$IMAGE" >/dev/null
echo "make-base-image: built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)" >&2
