#!/usr/bin/env bash
# Re-pin requirements/lock.txt from pyproject.toml: names and versions only (no registry
# address, unlike a uv.lock). The overrides in [tool.uv] are applied by uv.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${PLATFORM_CACHE:-/var/cache/platform-orchestrator}/uv-0.13.9/bin/uv"
"$UV" pip compile pyproject.toml --extra dev --extra lab --python-version 3.11 --no-header \
  --no-annotate -o requirements/lock.txt
