#!/usr/bin/env bash
# Build the traffic-color image without a Docker engine, then smoke-test it.
#
#   1. base: `debootstrap --variant=minbase bookworm`, packed as a tarball and
#      cached outside the repository (a fresh base costs ~30 s; later builds
#      reuse it), imported into buildah storage as $BASE_IMAGE;
#   2. build: `buildah bud` (vfs storage, chroot isolation) of ./Dockerfile with
#      BASE=$BASE_IMAGE, the machine's CA bundle mounted for pip as a build secret
#      and its path passed in the CA_BUNDLE build arg (a secret is in no layer);
#   3. smoke: `buildah run` answers `traffic-color --version` and
#      `traffic-color check` on examples/policy.yaml.
#
# Environment: TRAFFIC_COLOR_CACHE (default /var/cache/traffic-color),
# IMAGE (default localhost/traffic-color:VERSION), EXPORT=1 to also write an
# oci-archive to image/. Needs root (chroot isolation, debootstrap). Builds that
# share the cache take turns (flock on ${CACHE}/build.lock) for steps 1 and 2.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${TRAFFIC_COLOR_CACHE:-/var/cache/traffic-color}"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' sidecar/__init__.py)"
IMAGE="${IMAGE:-localhost/traffic-color:${VERSION}}"
BASE_IMAGE="localhost/debian-minbase:bookworm"
BASE_TAR="${CACHE}/debian-bookworm-minbase.tar"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_FILE="${CA_FILE:-/etc/ssl/certs/ca-certificates.crt}"
STORAGE=(--root "${CACHE}/storage" --runroot "${CACHE}/run" --storage-driver vfs)

log() { printf '[image %(%H:%M:%S)T] %s\n' -1 "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "image.sh: needs root (debootstrap and buildah's chroot isolation)" >&2
  exit 1
fi
need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
mkdir -p "${CACHE}"
# Another build in this storage (a test run beside ours) would otherwise write the
# same base tarball, or lose the layers of its build to our prune below.
exec 9>"${CACHE}/build.lock"
flock -w 1800 9 || { echo "image.sh: ${CACHE}/build.lock held for 30 min" >&2; exit 1; }

# ------------------------------------------------------------------ 1. base
if [ ! -s "${BASE_TAR}" ]; then
  log "debootstrap --variant=minbase bookworm (cached at ${BASE_TAR})"
  root="$(mktemp -d "${CACHE}/rootfs.XXXXXX")"
  trap 'rm -rf "${root}"' EXIT
  debootstrap --variant=minbase bookworm "${root}" "${MIRROR}" >"${CACHE}/debootstrap.log" 2>&1 \
    || { tail -20 "${CACHE}/debootstrap.log" >&2; exit 1; }
  # Make it look like debian:bookworm-slim: all three suites, no caches.
  rm -f "${root}/etc/apt/sources.list"
  cat >"${root}/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: ${MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "${root}"/var/lib/apt/lists/* "${root}"/var/cache/apt/*.bin \
    "${root}"/var/cache/apt/archives/*.deb "${root}"/var/log/*.log
  tar --numeric-owner -C "${root}" -cf "${BASE_TAR}.tmp" .
  mv "${BASE_TAR}.tmp" "${BASE_TAR}"
  rm -rf "${root}"
  trap - EXIT
fi
base_id="$(sha256sum "${BASE_TAR}" | cut -c1-16)"
if [ "$(buildah "${STORAGE[@]}" inspect --type image \
        --format '{{index .ImageAnnotations "traffic-color.base"}}' "${BASE_IMAGE}" \
        2>/dev/null || true)" != "${base_id}" ]; then
  log "importing base ${BASE_TAR} as ${BASE_IMAGE}"
  ctr="$(buildah "${STORAGE[@]}" from scratch)"
  buildah "${STORAGE[@]}" add "${ctr}" "${BASE_TAR}" / >/dev/null
  buildah "${STORAGE[@]}" config --annotation "traffic-color.base=${base_id}" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "${ctr}"
  buildah "${STORAGE[@]}" commit --rm -q "${ctr}" "${BASE_IMAGE}" >/dev/null
fi

# ------------------------------------------------------------------ 2. build
log "buildah bud -> ${IMAGE}"
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
buildah "${STORAGE[@]}" bud --isolation chroot --layers --pull=false \
  --build-arg "BASE=${BASE_IMAGE}" \
  --build-arg "VERSION=${VERSION}" --build-arg "REVISION=${revision}" \
  --secret "id=ca-bundle,src=${CA_FILE}" --build-arg CA_BUNDLE=/run/secrets/ca-bundle \
  -f Dockerfile -t "${IMAGE}" . >"${CACHE}/build.log" 2>&1 \
  || { tail -40 "${CACHE}/build.log" >&2; exit 1; }
# Drop the untagged images that earlier builds of the same tag left behind.
buildah "${STORAGE[@]}" rmi --prune >/dev/null 2>&1 || true
exec 9>&-  # the lock: from here on only our own tag is used

# ------------------------------------------------------------------ 3. smoke
ctr="$(buildah "${STORAGE[@]}" from --pull-never "${IMAGE}")"
trap 'buildah "${STORAGE[@]}" rm "${ctr}" >/dev/null 2>&1 || true' EXIT
policy="$(realpath examples/policy.yaml)"
log "smoke: traffic-color --version"
buildah "${STORAGE[@]}" run --isolation chroot "${ctr}" -- traffic-color --version
log "smoke: traffic-color check examples/policy.yaml"
buildah "${STORAGE[@]}" run --isolation chroot \
  --volume "${policy}:/etc/traffic-color/policy.yaml:ro" "${ctr}" -- \
  traffic-color check /etc/traffic-color/policy.yaml

if [ "${EXPORT:-0}" = 1 ]; then
  mkdir -p image
  log "exporting image/traffic-color-${VERSION}.oci.tar"
  buildah "${STORAGE[@]}" push -q "${IMAGE}" "oci-archive:image/traffic-color-${VERSION}.oci.tar:${IMAGE}"
fi
log "done: ${IMAGE}"
