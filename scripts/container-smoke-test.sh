#!/usr/bin/env bash
# Container smoke test: builds the Containerfile with podman and checks the image really serves.
#
#   scripts/container-smoke-test.sh          (as root; Debian/Ubuntu host)
#
# What it does:
#   1. installs podman, runc and debootstrap with apt-get when missing (the one allowed skip: when
#      they cannot be installed it prints a SKIPPED banner and exits 0);
#   2. points podman at a project-local containers.conf (runc, no default ulimits) and, when the
#      default storage driver does not work here, a project-local vfs storage.conf;
#   3. builds a Debian bookworm base image with debootstrap (python3, python3-venv,
#      ca-certificates) - no registry is needed - and caches it;
#   4. builds the Containerfile on that base with the CPU wheel of torch handed in;
#   5. runs the image as an arbitrary UID in group 0 with a tiny random-weight model mounted
#      read-only at /mnt/models, and checks readiness, a v1 and a v2 request (PNG decoded, size
#      checked), the UID, that nothing was written to the model, the writable cache dirs, the
#      image's configuration, and that the image has no compiler.
# Exits non-zero when any check fails.
#
# Environment (all optional):
#   SMOKE_CACHE      cache dir (default: .cache/container): base tarball, torch wheel, podman config
#   SMOKE_IMAGE      tag of the image built (default: localhost/sdserve:test)
#   VENV             host virtualenv with sdserve installed (default: .venv, from `make install`)
#   TORCH_VERSION    torch version of the CPU wheel (default: 2.13.0)
#   TORCH_WHEEL      use this torch wheel file instead of looking for one
#   DEBIAN_MIRROR    debootstrap mirror (default: the host's apt source, else deb.debian.org)
#   SMOKE_STORAGE_DRIVER  force a storage driver: "vfs" (project-local storage) or "default"
#   SMOKE_NETWORK    "host": run the server with --network host instead of publishing a port
#   READY_TIMEOUT    seconds to wait for the server to become ready (default: 300)
#   SMOKE_NO_CACHE=1 build the image with --no-cache
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CACHE=${SMOKE_CACHE:-$ROOT/.cache/container}
IMAGE=${SMOKE_IMAGE:-localhost/sdserve:test}
BASE_IMAGE=localhost/sdserve-base:bookworm
SUITE=bookworm
VENV=${VENV:-$ROOT/.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
READY_TIMEOUT=${READY_TIMEOUT:-300}
TEST_UID=1000870000
MODEL_NAME=sdxl

T_START=$(date +%s)
TIMINGS=()
FAILURES=()
CTR=""
RUN_DIR=""

log() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }
ok() { printf '    ok: %s\n' "$*"; }
fail() { printf '    FAILED: %s\n' "$*" >&2; FAILURES+=("$*"); }
# check WHAT DETAIL TEST...: run TEST; "ok: WHAT", or "FAILED: WHAT: DETAIL".
check() {
    local what=$1 detail=$2
    shift 2
    if "$@"; then ok "$what"; else fail "$what: $detail"; fi
}
# like STRING GLOB: does STRING match the glob pattern?
# shellcheck disable=SC2053 # the right-hand side is a glob on purpose
like() { [[ $1 == $2 ]]; }
# timed NAME CMD...: run CMD, remember how long it took.
timed() {
    local name=$1 t0 rc=0
    shift
    t0=$(date +%s)
    "$@" || rc=$?
    TIMINGS+=("$(printf '%-34s %5ss' "$name" "$(($(date +%s) - t0))")")
    return "$rc"
}

skip_banner() {
    local bang='!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
    printf '\n%s\n%s\n!!!! SKIPPED: podman could not be installed: %s\n!!!! The container smoke test did NOT run.\n%s\n%s\n\n' \
        "$bang" "$bang" "$*" "$bang" "$bang" >&2
    exit 0
}

cleanup() {
    local rc=$?
    if [[ -n $CTR ]]; then
        if ((rc != 0)) || ((${#FAILURES[@]})); then
            printf '\n---- podman logs %s (last 200 lines) ----\n' "$CTR" >&2
            podman logs --tail 200 "$CTR" >&2 2>&1 || true
            printf -- '---- end of logs ----\n' >&2
        fi
        podman rm -f -t 5 "$CTR" >/dev/null 2>&1 || true
    fi
    [[ -n $RUN_DIR ]] && rm -rf "$RUN_DIR"
    return "$rc"
}
trap cleanup EXIT

# --------------------------------------------------------------------------------------------------
# 0. root, tools
if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -E "$0" "$@"
    fi
    die "run as root (debootstrap and rootful podman need it)"
fi

install_tools() {
    local missing=() t
    for t in podman runc debootstrap curl; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} with apt-get"
    command -v apt-get >/dev/null 2>&1 || skip_banner "${missing[*]} missing and there is no apt-get"
    local out="$CACHE/apt-get.log"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >"$out" 2>&1; then
        skip_banner "apt-get install ${missing[*]} failed: $(tail -n 3 "$out" | tr '\n' ' ')"
    fi
    for t in "${missing[@]}"; do
        command -v "$t" >/dev/null 2>&1 || skip_banner "$t still missing after apt-get install (see $out)"
    done
}

mkdir -p "$CACHE"
timed "install podman/runc/debootstrap" install_tools
note "$(podman --version), runc $(runc --version | sed -n 's/^runc version //p'), debootstrap $(debootstrap --version | awk '{print $2}')"

[[ -x $VENV/bin/sdserve && -x $VENV/bin/python ]] ||
    die "no host virtualenv at $VENV (it writes the tiny test model and checks the PNGs): run 'make install' first"

# --------------------------------------------------------------------------------------------------
# 1. podman configuration: project-local, nothing under /etc is changed.
log "podman configuration"
cat >"$CACHE/containers.conf" <<'EOF'
# Written by scripts/container-smoke-test.sh. crun fails on cgroups in nested sandboxes and the
# default ulimits (nofile/nproc) cannot be set there: runc, no default ulimits, no pids limit.
[containers]
default_ulimits = []
pids_limit = 0

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$CACHE/containers.conf"
note "CONTAINERS_CONF=$CONTAINERS_CONF"

use_vfs_storage() {
    mkdir -p "$CACHE/storage"
    cat >"$CACHE/storage.conf" <<EOF
# Written by scripts/container-smoke-test.sh: overlay does not work on this host.
[storage]
driver = "vfs"
graphroot = "$CACHE/storage/vfs"
runroot = "/run/sdserve-smoke-containers"
EOF
    export CONTAINERS_STORAGE_CONF="$CACHE/storage.conf"
}

# Can the default storage driver create and mount a container's root filesystem here?
default_storage_works() {
    local probe ctr rc=0
    podman info >/dev/null 2>&1 || return 1
    probe=$(mktemp -d)
    echo probe >"$probe/probe"
    tar -C "$probe" -c . | podman import -q - localhost/sdserve-storage-probe:latest >/dev/null 2>&1 || rc=1
    rm -rf "$probe"
    if ((rc == 0)); then
        ctr=$(podman create localhost/sdserve-storage-probe:latest /probe 2>/dev/null) || rc=1
        if ((rc == 0)); then
            mnt=$(podman mount "$ctr" 2>/dev/null) && [[ -f $mnt/probe ]] || rc=1
            podman umount "$ctr" >/dev/null 2>&1 || true
            podman rm -f "$ctr" >/dev/null 2>&1 || true
        fi
    fi
    podman rmi -f localhost/sdserve-storage-probe:latest >/dev/null 2>&1 || true
    return "$rc"
}

case ${SMOKE_STORAGE_DRIVER:-auto} in
vfs) use_vfs_storage ;;
default) ;;
auto)
    if [[ -f $CACHE/storage.conf ]] && grep -q '"vfs"' "$CACHE/storage.conf"; then
        use_vfs_storage # chosen on an earlier run
    elif ! default_storage_works; then
        note "the default storage driver does not work here: switching to vfs"
        use_vfs_storage
    fi
    ;;
*) die "SMOKE_STORAGE_DRIVER must be auto, vfs or default" ;;
esac
note "storage driver: $(podman info --format '{{.Store.GraphDriverName}}') ($(podman info --format '{{.Store.GraphRoot}}'))"
[[ -n ${CONTAINERS_STORAGE_CONF:-} ]] && note "CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"

# --------------------------------------------------------------------------------------------------
# 2. base image: Debian bookworm from debootstrap (no registry needed)
debian_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local m=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        m=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
            /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $m && -f /etc/apt/sources.list ]]; then
        m=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
            /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

build_base_image() {
    local tarball="$CACHE/base-$SUITE.tar" rootfs="$CACHE/rootfs-$SUITE" mirror
    if podman image exists "$BASE_IMAGE"; then
        note "$BASE_IMAGE exists (cached)"
        return
    fi
    if [[ ! -s $tarball ]]; then
        mirror=$(debian_mirror)
        note "debootstrap $SUITE from $mirror"
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
            { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
        # apt's downloaded packages and lists are not needed in the image.
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
        tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" .
        mv "$tarball.partial" "$tarball"
        rm -rf "$rootfs"
    else
        note "using cached $tarball"
    fi
    podman import -q --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
    note "imported $BASE_IMAGE"
}
log "base image $BASE_IMAGE"
timed "base image (debootstrap + import)" build_base_image

# --------------------------------------------------------------------------------------------------
# 3. torch CPU wheel for the build (the default TORCH_SPEC is the multi-GB CUDA build)
find_torch_wheel() {
    local wheels="$CACHE/wheels" arch tmp f
    arch=$(uname -m)
    mkdir -p "$wheels"
    if [[ -n ${TORCH_WHEEL:-} ]]; then
        [[ -f $TORCH_WHEEL ]] || die "TORCH_WHEEL=$TORCH_WHEEL does not exist"
        cp -f "$TORCH_WHEEL" "$wheels/"
        WHEEL=$(basename "$TORCH_WHEEL")
        return
    fi
    WHEEL=$(find "$wheels" -maxdepth 1 -name "torch-$TORCH_VERSION+cpu-cp311-cp311-*_$arch.whl" -printf '%f\n' | head -n 1)
    if [[ -n $WHEEL ]]; then
        note "cached: $WHEEL"
        return
    fi
    local target=(--no-deps --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
        --platform "manylinux_2_28_$arch")
    tmp=$(mktemp -d)
    # First pip's configured find-links only (a local wheel folder), never PyPI: PyPI's torch is
    # the CUDA build.
    "$VENV/bin/python" -m pip download -q "${target[@]}" --no-index -d "$tmp" "torch==$TORCH_VERSION" >/dev/null 2>&1 || true
    f=$(find "$tmp" -maxdepth 1 -name 'torch-*.whl' | head -n 1)
    if [[ -z $f || $f != *+cpu* ]]; then
        rm -f "$tmp"/*
        note "no local CPU wheel: downloading torch==$TORCH_VERSION+cpu from download.pytorch.org"
        "$VENV/bin/python" -m pip download -q "${target[@]}" --index-url https://download.pytorch.org/whl/cpu \
            -d "$tmp" "torch==$TORCH_VERSION+cpu" || die "cannot download the CPU wheel of torch $TORCH_VERSION"
        f=$(find "$tmp" -maxdepth 1 -name 'torch-*.whl' | head -n 1)
    fi
    [[ -n $f ]] || die "no torch wheel downloaded"
    WHEEL=$(basename "$f")
    WHEEL=${WHEEL//%2B/+}
    [[ $WHEEL == *+cpu* ]] || die "the torch wheel found is not the CPU build: $WHEEL"
    mv "$f" "$wheels/$WHEEL"
    rm -rf "$tmp"
    note "downloaded: $WHEEL"
}
log "torch CPU wheel"
timed "torch CPU wheel" find_torch_wheel

# --------------------------------------------------------------------------------------------------
# 4. build the image
build_image() {
    local args=(--isolation chroot --network host --pull=never --layers
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "RUNTIME_IMAGE=$BASE_IMAGE"
        --build-arg "TORCH_SPEC=/wheels/$WHEEL" --volume "$CACHE/wheels:/wheels:ro"
        -f Containerfile -t "$IMAGE")
    # The host's CA bundle, for pip behind a TLS-inspecting proxy (build steps only).
    local ca=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
    if [[ -f $ca ]]; then
        args+=(--volume "$(readlink -f "$ca"):/run/host-ca-bundle.crt:ro" --build-arg PIP_CERT=/run/host-ca-bundle.crt)
    fi
    [[ -n ${PIP_INDEX_URL:-} ]] && args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
    [[ ${SMOKE_NO_CACHE:-0} == 1 ]] && args+=(--no-cache)
    local old_id new_id
    old_id=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    note "podman build ${args[*]} ."
    podman build "${args[@]}" . >"$CACHE/build.log" 2>&1 ||
        { tail -n 60 "$CACHE/build.log" >&2; die "podman build failed (log: $CACHE/build.log)"; }
    # The image this tag pointed at before is dangling now: drop it (cached layers stay).
    new_id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
    if [[ -n $old_id && $old_id != "$new_id" ]]; then
        podman rmi "$old_id" >/dev/null 2>&1 || true
    fi
    grep -E '^(\[[0-9]+/[0-9]+\] )?STEP|Using cache' "$CACHE/build.log" | sed 's/^/    /' | cut -c1-150 || true
}
log "building $IMAGE (log: $CACHE/build.log)"
timed "podman build" build_image
IMAGE_SIZE=$(podman images --format '{{.Size}}' "$IMAGE" | head -n 1)
note "$(podman images "$IMAGE")"

# --------------------------------------------------------------------------------------------------
# 5. image checks that need no server
log "image configuration"
cfg=$(podman image inspect --format '{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.ExposedPorts}}' "$IMAGE")
check "USER 1001" "the image's user is '${cfg%%|*}'" [ "${cfg%%|*}" = 1001 ]
check "entrypoint: the venv's python -m sdserve" "$cfg" like "$cfg" '*"/opt/sdserve/bin/python","-m","sdserve"*'
check "exposes 8080 and 8081" "$cfg" like "$cfg" '*8080/tcp*8081/tcp*'
env_out=$(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE")
for kv in HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1; do
    check "$kv" "not set in the image" grep -qx "$kv" <<<"$env_out"
done
for v in HOME HF_HOME XDG_CACHE_HOME TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR TMPDIR; do
    grep -q "^$v=" <<<"$env_out" || fail "$v not set in the image"
done

torch_version=$(podman run --rm --entrypoint python "$IMAGE" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
check "torch $torch_version (the CPU wheel handed in)" "expected the CPU wheel $WHEEL" like "$torch_version" '*+cpu'

log "no compiler in the image"
compilers=$(podman run --rm --entrypoint sh "$IMAGE" -c 'command -v gcc cc c++ g++ clang || true')
check "no gcc/cc/c++/g++/clang" "compiler(s) in the image: $compilers" [ -z "$compilers" ]
weights=$(podman run --rm --entrypoint sh "$IMAGE" -c 'ls -A /mnt/models 2>/dev/null; ls -d /opt/models 2>/dev/null || true')
check "no model baked in (/mnt/models empty, no /opt/models)" "found: $weights" [ -z "$weights" ]

# --------------------------------------------------------------------------------------------------
# 6. run the server as an arbitrary UID with a read-only model
RUN_DIR=$(mktemp -d "$CACHE/run.XXXXXX")
MODEL="$RUN_DIR/model"
log "tiny model"
timed "tiny model" "$VENV/bin/sdserve" tiny-model "$MODEL" --kind sdxl-refiner >"$CACHE/tiny-model.log" 2>&1 ||
    { cat "$CACHE/tiny-model.log" >&2; die "sdserve tiny-model failed"; }
note "$(tail -n 1 "$CACHE/tiny-model.log")"
chmod -R a+rX "$RUN_DIR"
(cd "$MODEL" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$RUN_DIR/model.before"
touch "$RUN_DIR/stamp"

free_port() {
    "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT=$(free_port)
CTR="sdserve-smoke-$$"
run_args=(-d --name "$CTR" --runtime runc --user "$TEST_UID:0"
    --cap-drop=ALL --security-opt no-new-privileges
    -v "$MODEL:/mnt/models:ro")
server_args=()
if [[ ${SMOKE_NETWORK:-} == host ]]; then
    run_args+=(--network host)
    server_args+=(--http_port "$PORT" --grpc_port "$(free_port)")
else
    run_args+=(-p "127.0.0.1:$PORT:8080")
fi
URL="http://127.0.0.1:$PORT"
log "starting the server: podman run ${run_args[*]} $IMAGE ${server_args[*]}"
podman run "${run_args[@]}" "$IMAGE" "${server_args[@]}" >/dev/null

wait_ready() {
    local deadline=$(($(date +%s) + READY_TIMEOUT)) state
    while :; do
        state=$(podman inspect --format '{{.State.Status}}' "$CTR" 2>/dev/null || echo gone)
        if [[ $state != running ]]; then
            echo "    the container stopped (state: $state) before it was ready" >&2
            return 1
        fi
        if curl -fsS -m 5 -o /dev/null "$URL/v2/health/ready" 2>/dev/null &&
            curl -fsS -m 5 -o /dev/null "$URL/v2/models/$MODEL_NAME/ready" 2>/dev/null; then
            return 0
        fi
        if (($(date +%s) > deadline)); then
            echo "    not ready after ${READY_TIMEOUT}s" >&2
            return 1
        fi
        sleep 2
    done
}
log "waiting for readiness at $URL (timeout ${READY_TIMEOUT}s)"
if timed "server start until ready" wait_ready; then
    ok "/v2/health/ready and /v2/models/$MODEL_NAME/ready answer 200"
else
    fail "server did not become ready"
    exit 1 # the trap prints the logs
fi

# --------------------------------------------------------------------------------------------------
# 7. requests
check_requests() {
    "$VENV/bin/python" - "$URL" "$MODEL_NAME" <<'PY'
import base64, io, json, sys, time, urllib.request
from PIL import Image

url, model = sys.argv[1], sys.argv[2]
failed = 0

def post(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.load(resp), time.monotonic() - t0

def png(b64, where):
    raw = base64.b64decode(b64)
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise AssertionError(f"{where}: not a PNG")
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img

def check(name, fn):
    global failed
    try:
        detail = fn()
        print(f"    ok: {name}: {detail}")
    except Exception as exc:  # noqa: BLE001
        failed += 1
        body = exc.read().decode(errors="replace")[:500] if hasattr(exc, "read") else ""
        print(f"    FAILED: {name}: {type(exc).__name__}: {exc} {body}", file=sys.stderr)

def v1():
    body = {"instances": [{"prompt": "a dog", "num_inference_steps": 4, "seed": 1, "width": 96, "height": 64}]}
    out, dt = post(f"/v1/models/{model}:predict", body)
    image = out["predictions"][0]["image"]
    img = png(image["b64"], "v1")
    assert img.size == (96, 64), f"size {img.size}, expected (96, 64)"
    assert image["seed"] == 1, f"seed {image['seed']}"
    return f"PNG {img.size[0]}x{img.size[1]} {img.mode}, seed {image['seed']}, {dt:.2f}s"

def v2():
    body = {"id": "42",
            "inputs": [{"name": "input0", "shape": [-1], "datatype": "BYTES", "data": ["Photo of a dog"]}],
            "parameters": {"num_inference_steps": 4, "seed": 7, "width": 64, "height": 96}}
    out, dt = post(f"/v2/models/{model}/infer", body)
    assert out.get("id") == "42", f"id {out.get('id')!r}"
    o = {x["name"]: x for x in out["outputs"]}
    assert [x["name"] for x in out["outputs"]][:2] == ["image", "seed"], f"outputs {list(o)}"
    assert o["image"]["datatype"] == "BYTES" and o["seed"]["datatype"] == "INT64", "datatypes"
    img = png(o["image"]["data"][0], "v2")
    assert img.size == (64, 96), f"size {img.size}, expected (64, 96)"
    assert o["seed"]["data"][0] == 7, f"seed {o['seed']['data']}"
    return f"PNG {img.size[0]}x{img.size[1]} {img.mode}, seed {o['seed']['data'][0]}, id echoed, {dt:.2f}s"

check("v1 predict", v1)
check("v2 infer", v2)
sys.exit(1 if failed else 0)
PY
}
log "requests"
timed "v1 + v2 requests" check_requests || fail "v1/v2 requests"

# --------------------------------------------------------------------------------------------------
# 8. the running container: UID, writable caches, read-only model
log "the running container"
pid1_uid=$(podman exec "$CTR" sh -c 'grep "^Uid:" /proc/1/status' | awk '{print $2}')
exec_uid=$(podman exec "$CTR" id -u)
check "server runs as uid $TEST_UID" "PID 1 has uid '$pid1_uid', exec '$exec_uid'" \
    [ "$pid1_uid" = "$TEST_UID" -a "$exec_uid" = "$TEST_UID" ]
exec_gid=$(podman exec "$CTR" id -g)
check "group 0" "gid is $exec_gid" [ "$exec_gid" = 0 ]
not_writable=$(podman exec "$CTR" sh -c 'for d in "$HOME" "$XDG_CACHE_HOME" "$HF_HOME" "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR" "$TMPDIR"; do
    f="$d/.smoke-$$"; (: >"$f" && rm -f "$f") 2>/dev/null || echo "$d"; done')
check "HOME, caches and TMPDIR writable for uid $TEST_UID" "not writable: ${not_writable//$'\n'/ }" [ -z "$not_writable" ]
if podman exec "$CTR" sh -c ': >/mnt/models/.smoke-probe' 2>/dev/null; then
    fail "/mnt/models is writable inside the container"
else
    ok "/mnt/models is read-only inside the container"
fi
(cd "$MODEL" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$RUN_DIR/model.after"
newer=$(find "$MODEL" -newer "$RUN_DIR/stamp" | head -n 5)
if cmp -s "$RUN_DIR/model.before" "$RUN_DIR/model.after" && [[ -z $newer ]]; then
    ok "nothing under /mnt/models was changed"
else
    fail "the model folder changed during the run: ${newer:-checksums differ}"
fi
state=$(podman inspect --format '{{.State.Status}}' "$CTR")
check "server still running after the requests" "container state: $state" [ "$state" = running ]

# --------------------------------------------------------------------------------------------------
T_TOTAL=$(($(date +%s) - T_START))
printf '\n==> summary\n'
printf '    image: %s (%s)\n' "$IMAGE" "$IMAGE_SIZE"
printf '    %s\n' "${TIMINGS[@]}"
printf '    %-34s %5ss\n' "total" "$T_TOTAL"
if ((${#FAILURES[@]})); then
    printf '\nCONTAINER SMOKE TEST FAILED (%d):\n' "${#FAILURES[@]}" >&2
    printf '  - %s\n' "${FAILURES[@]}" >&2
    exit 1
fi
printf '\nCONTAINER SMOKE TEST PASSED\n'
