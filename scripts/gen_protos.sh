#!/usr/bin/env bash
# Regenerates the committed Python stubs from proto/ into OUT (default: the repo root, so
# proto package usher.v1 lands in usher/v1/ and the vendored buf.validate in buf/validate/).
# `--check` regenerates into a temporary directory and fails when the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
out=.
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/usher/v1" "$out/buf/validate"
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/usher/v1/*.proto
# The vendored protovalidate rules (proto/buf/validate/README.md): messages only.
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --mypy_out="$out" \
  proto/buf/validate/validate.proto
touch "$out/usher/v1/__init__.py" "$out/buf/__init__.py" "$out/buf/validate/__init__.py"
if [ "${1:-}" = "--check" ]; then
  for dir in usher/v1 buf; do
    if ! diff -r -x __pycache__ "$out/$dir" "$dir"; then
      echo "generated stubs are stale: run 'make protos' and commit $dir/" >&2
      exit 1
    fi
  done
  echo "stubs up to date"
fi
