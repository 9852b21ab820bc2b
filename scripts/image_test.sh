#!/usr/bin/env bash
# Build Usher's image with podman, offline, and run the trio for real (`make image-test`):
#
#   scripts/image_test.sh              # build + run + report; exit 0 = nothing accepted lost
#   scripts/image_test.sh --build-only
#
# 1. Tools: podman, runc, mmdebstrap (Debian packages; installed with apt-get when missing
#    and running as root). podman always runs with `--runtime runc` (crun fails on these
#    VMs' cgroup setup) and explicit nofile / nproc ulimits.
# 2. Base images without any container registry: Debian bookworm made by mmdebstrap from
#    Debian's mirror, `podman import`ed: one with Python 3.11 (the image's base, as
#    python:3.11-slim-bookworm would be), one with redis-server. Cached in podman's store.
# 3. Wheels on the host (`pip download` for CPython 3.11 / manylinux x86_64) into
#    deploy/docker/wheels/, then `podman build --network none --build-arg PIP_NO_INDEX=1`:
#    pip inside the build never reaches an index.
# 4. usher.testing.container_stack: Redis, the emulator, Pool, Scheduler, Notifier and the
#    gateway as containers on a podman network, production mode with generated secrets;
#    requests through the gateway while the Scheduler and then Redis are SIGKILLed and
#    restarted; every accepted request must complete. Prints figures as JSON lines.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-.venv/bin/python}"
WORK="$ROOT/.image-test"
IMAGE="${USHER_IMAGE:-localhost/usher:image-test}"
BASE="localhost/usher-base-python:bookworm"
REDIS_IMAGE="localhost/usher-base-redis:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$WORK"

podman_() { podman --runtime runc "$@"; }
now() { date +%s.%N; }
since() { "$PYTHON" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }
figure() { printf '{"figure": "%s", "value": %s, "unit": "%s"}\n' "$1" "$2" "$3"; }

# ---- 1. tools ---------------------------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "image_test: needs ${missing[*]} (apt-get install podman runc mmdebstrap)" >&2
        exit 2
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc mmdebstrap
fi

# ---- 2. base images, offline (Debian's mirror only) -------------------------------------------
base_image() {
    local name="$1" packages="$2"
    if podman_ image exists "$name"; then return; fi
    local started; started=$(now)
    mmdebstrap --variant=minbase --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --aptopt='Acquire::Languages "none"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$WORK/base.tar" "deb $MIRROR bookworm main" \
        "deb $MIRROR-security bookworm-security main" >"$WORK/mmdebstrap.log" 2>&1 \
        || { tail -20 "$WORK/mmdebstrap.log" >&2; exit 1; }
    podman_ import --quiet --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$name" >/dev/null
    rm -f "$WORK/base.tar"
    figure "base image $name made (mmdebstrap + import)" "$(since "$started")" s
}
base_image "$BASE" python3,python3-venv,python-is-python3,ca-certificates
base_image "$REDIS_IMAGE" redis-server

# ---- 3. wheels on the host, then an offline build ---------------------------------------------
started=$(now)
"$PYTHON" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > "$WORK/requirements.txt"
# For the base image's own interpreter (tags and Requires-Python). pip decides environment
# markers for the host's interpreter even so, so a dependency behind a marker that holds in
# the image only is named too: redis needs async-timeout below Python 3.11.3 (Debian: 3.11.2).
PY_VERSION="$(podman_ run --rm --network none --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 "$BASE" python3 -c 'import platform; print(platform.python_version())')"
ARCH="$(uname -m)"
"$PYTHON" -m pip download --disable-pip-version-check \
    --only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "cp$(echo "$PY_VERSION" | cut -d. -f1,2 | tr -d .)" \
    --abi abi3 --abi none \
    --platform "manylinux2014_$ARCH" --platform "manylinux_2_17_$ARCH" \
    --platform "manylinux_2_28_$ARCH" --platform "linux_$ARCH" \
    -d deploy/docker/wheels -r "$WORK/requirements.txt" 'setuptools>=69' wheel 'async-timeout>=4.0.3' \
    >"$WORK/pip-download.log" 2>&1 || { grep -v '^WARNING: Location' "$WORK/pip-download.log" | tail -20 >&2; exit 1; }
figure "wheels downloaded on the host" "$(since "$started")" s

started=$(now)
podman_ build --network none --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --build-arg PYTHON_IMAGE="$BASE" --build-arg PIP_NO_INDEX=1 \
    --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
figure "image build (podman, offline)" "$(since "$started")" s
figure "image size" "$(podman_ image inspect --format '{{.Size}}' "$IMAGE")" bytes

[[ "${1:-}" == "--build-only" ]] && exit 0

# ---- 4. run the trio and send real requests ---------------------------------------------------
exec "$PYTHON" -m usher.testing.container_stack --image "$IMAGE" --redis-image "$REDIS_IMAGE" \
    --work "$WORK"
