#!/usr/bin/env bash
# Build the CPU image (san:cpu) on this machine, with no Docker engine and no registry: what `make image` runs,
# as root, from a clean Debian 12 machine. Idempotent: reruns reuse the root filesystem, the base image and
# buildah's layer cache.
#   1. buildah, debootstrap and iproute2 from apt (role imagebuild of deploy/apt-packages.txt), when missing;
#   2. a minbase Debian bookworm root filesystem, debootstrapped once into $SAN_IMAGE_CACHE;
#   3. that root filesystem committed as the local base image localhost/san-debian-base:bookworm (once);
#   4. buildah bud docker/Dockerfile FROM it, pip pointed at this machine's wheels and indexes (served on
#      loopback during the build) and its CA bundle (a build secret): build arguments, never the image's ENV;
#   5. checks inside the image: `san --version`, the imports, and a real 1-epoch job on a 256-image
#      Fashion-MNIST slice, in network and PID namespaces of its own (a second Ray on this host would collide
#      with Ray's fixed ports); then the working container is removed.
# Environment: SAN_IMAGE_TAG (san:cpu), SAN_IMAGE_CACHE (/var/cache/san-image), DEBIAN_MIRROR
# (http://deb.debian.org/debian), SAN_PIP_PORT (38531, loopback, during the build), SAN_IMAGE_JOB=0 skips the
# job, SAN_IMAGE_REFRESH=1 rebuilds the base.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${SAN_IMAGE_TAG:-san:cpu}
BASE=localhost/san-debian-base:bookworm
CACHE=${SAN_IMAGE_CACHE:-/var/cache/san-image}
ROOTFS=$CACHE/rootfs-bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=/etc/ssl/certs/ca-certificates.crt
PIP_PORT=${SAN_PIP_PORT:-38531}
START=$SECONDS

die() {
    echo "build-image: error: $*" >&2
    exit 1
}
step() { printf '== [%4ss] %s\n' "$((SECONDS - START))" "$*"; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and buildah's chroot isolation need it)"
[ -f docker/Dockerfile ] || die "docker/Dockerfile not found; run from the repository"

containers=()
server=""
served=""
cleanup() {
    local ctr
    for ctr in "${containers[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
    [ -z "$server" ] || kill "$server" 2>/dev/null || true
    [ -z "$served" ] || rm -rf "$served"
}
trap cleanup EXIT

# 1. Tools ---------------------------------------------------------------------------------------------------
read -r -a tools <<<"$(deploy/packages.sh imagebuild)"
if ! dpkg -s "${tools[@]}" >/dev/null 2>&1; then
    step "installing ${tools[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tools[@]}" \
        || die "apt-get could not install ${tools[*]}"
fi

# 2. Root filesystem -----------------------------------------------------------------------------------------
if [ "${SAN_IMAGE_REFRESH:-0}" = 1 ]; then
    step "SAN_IMAGE_REFRESH=1: removing the cached root filesystem and $BASE"
    rm -rf "$ROOTFS" "$ROOTFS.done"
    buildah rmi "$BASE" >/dev/null 2>&1 || true
fi
if [ ! -f "$ROOTFS.done" ]; then
    step "debootstrap --variant=minbase bookworm into $ROOTFS (once)"
    rm -rf "$ROOTFS" "$ROOTFS.partial"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase bookworm "$ROOTFS.partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $CACHE/debootstrap.log"
    # The same suites as Debian's own bookworm image: updates and security too.
    cat >"$ROOTFS.partial/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    echo 'Acquire::Languages "none";' >"$ROOTFS.partial/etc/apt/apt.conf.d/docker-no-languages" # as Debian's image
    rm -rf "$ROOTFS.partial"/var/cache/apt/archives/*.deb "$ROOTFS.partial"/var/cache/apt/*.bin \
        "$ROOTFS.partial"/var/lib/apt/lists/*
    mv "$ROOTFS.partial" "$ROOTFS"
    touch "$ROOTFS.done"
    buildah rmi "$BASE" >/dev/null 2>&1 || true # a new root filesystem makes a new base image
fi

# 3. Base image ----------------------------------------------------------------------------------------------
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    step "committing $ROOTFS as $BASE"
    ctr=$(buildah from scratch)
    containers+=("$ctr")
    mnt=$(buildah mount "$ctr")
    cp -a "$ROOTFS/." "$mnt/"
    buildah umount "$ctr" >/dev/null
    buildah config --os linux --arch amd64 --cmd /bin/bash \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --quiet "$ctr" "$BASE" >/dev/null || die "could not commit $BASE"
fi

# 4. The image ---------------------------------------------------------------------------------------------------
# pip in the build uses this machine's wheels (the CPU torch) and local indexes, served read-only over HTTP on
# loopback (the build shares this network namespace) so that no bind mount leaves mount points in the image, and
# its CA bundle as a build secret (TLS to PyPI may pass a proxy that only this machine's bundle trusts). A fixed
# port: the URLs are build arguments, part of each layer's cache key. TORCH_INDEX_URL empty: torch's own index is
# not reachable from here, and the CPU wheel lies in /opt/wheels.
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_INDEX_URL=")
secrets=()
served=$(mktemp -d)
for dir in /opt/wheels /opt/pypi /opt/pypi-more; do
    if [ -d "$dir" ]; then ln -s "$dir" "$served/${dir##*/}"; fi
done
if [ -n "$(ls -A "$served")" ]; then
    python3 - "$served" "$PIP_PORT" <<'PY' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), handler).serve_forever()
PY
    server=$!
    url=http://127.0.0.1:$PIP_PORT
    for _ in $(seq 50); do
        sleep 0.2
        kill -0 "$server" 2>/dev/null || die "cannot serve the local wheels at $url (port taken? set SAN_PIP_PORT)"
        if python3 -c "import urllib.request as u; u.urlopen('$url/')" 2>/dev/null; then break; fi
    done
    sleep 0.2
    kill -0 "$server" 2>/dev/null || die "cannot serve the local wheels at $url (port taken? set SAN_PIP_PORT)"
    [ ! -d /opt/wheels ] || build_args+=(--build-arg "PIP_FIND_LINKS=$url/wheels/")
    indexes=()
    for name in pypi pypi-more; do [ ! -d "/opt/$name/simple" ] || indexes+=("$url/$name/simple/"); done
    [ "${#indexes[@]}" -eq 0 ] || build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${indexes[*]}")
fi
if [ -f "$HOST_CA" ]; then
    secrets+=(--secret "id=pip-ca,src=$HOST_CA")
    build_args+=(--build-arg PIP_CERT=/run/secrets/pip-ca)
fi

step "buildah bud docker/Dockerfile -> $TAG"
build_start=$SECONDS
# --format docker keeps HEALTHCHECK (OCI image metadata has no field for it); --layers caches each step.
buildah bud --isolation chroot --layers --pull=never --format docker \
    -f docker/Dockerfile -t "$TAG" "${build_args[@]}" "${secrets[@]}" . \
    || die "buildah bud failed (output above)"
build_s=$((SECONDS - build_start))

# 5. Checks inside the image ---------------------------------------------------------------------------------
step "checks in $TAG"
ctr=$(buildah from --pull=never "$TAG")
containers+=("$ctr")
in_image() { buildah run --isolation chroot "$ctr" -- "$@"; }
in_image san --version || die "san --version failed in the image"
in_image python -c 'import ffcv, mlflow, ray, torch; from importlib.metadata import version as v
print("imports: torch", torch.__version__, "ray", ray.__version__, "mlflow", v("mlflow"), "ffcv", v("ffcv"))' \
    || die "the imports failed in the image"
user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$TAG")
[ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] || die "the image runs as root ($user)"

if [ "${SAN_IMAGE_JOB:-1}" != 0 ]; then
    step "a 1-epoch job in the image (own network and PID namespaces)"
    log=$CACHE/image-job.log
    # shellcheck disable=SC2016 # expands in the image, not here
    job='set -e
echo "job as $(id -un) (uid $(id -u), HOME=$HOME) in $(pwd)"
san data build fashion-mnist --out /shared/data/fashion-mnist --subset 256
san train /app/configs/lenet5-fmnist.yaml --epochs 1 --workers 1 --job-id image-check
test -s /shared/storage/mlflow.db'
    # Fresh network and PID namespaces: this Ray's fixed ports cannot meet another Ray on the host (loopback
    # only), it cannot find the host's Ray processes (Ray looks for running GCS servers in /proc), and whatever
    # it leaves running ends with the namespace.
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash
    unshare --net --pid --fork --mount-proc -- bash -c 'ip link set lo up && exec buildah run --isolation chroot "$1" -- bash -c "$2"' \
        _ "$ctr" "$job" 2>&1 | tee "$log" || die "the job in the image failed; see $log"
    result=$(grep -E 'val/top1 [0-9.]+' "$log" | tail -n 1) || die "the job printed no val/top1; see $log"
fi

size=$(buildah images --format '{{.Size}}' "$TAG" | head -n 1)
step "done"
echo "image $TAG: $size; build (buildah bud) ${build_s}s; total $((SECONDS - START))s"
[ -z "${result:-}" ] || echo "job: $result"
