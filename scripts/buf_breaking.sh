#!/usr/bin/env bash
# `buf breaking` against the API as it was before this change: the merge-base with
# origin/main on a branch, else the previous commit on main.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/bin/buf}
head=$(git rev-parse HEAD 2>/dev/null) || { echo "buf breaking: not a git checkout, skipped"; exit 0; }
base=""
if main=$(git rev-parse -q --verify origin/main 2>/dev/null) && [ "$main" != "$head" ]; then
  base=$(git merge-base HEAD origin/main)
else
  base=$(git rev-parse -q --verify HEAD~1 2>/dev/null || true)
fi
if [ -z "$base" ] || ! git cat-file -e "$base:proto" 2>/dev/null; then
  echo "buf breaking: no earlier API to compare with, skipped"
  exit 0
fi
"$BUF" breaking --against ".git#ref=$base"
echo "buf breaking: no breaking change against $(git rev-parse --short "$base")"
