#!/usr/bin/env bash
# make setup: everything the project needs, idempotent, on a fresh Debian/Ubuntu with python3.
#   1. Debian packages listed in scripts/apt-packages.txt and lab/apt-packages.txt (only
#      the missing ones);
#   2. uv, pinned, in a private venv under the cache directory;
#   3. .venv with the exact pins of requirements/lock.txt and the project itself;
#   4. the lab's vCenter simulator, built from Debian's sources (lab/vcsim/build.sh,
#      cached outside the repository: rebuilt only when missing or its inputs changed).
# Everything that needs the network happens here: `make test` and `make bench` then run
# in a network namespace of their own, where apt cannot reach a mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PLATFORM_CACHE:-/var/cache/platform-orchestrator}"
UV_VERSION="0.13.9"
UV="$CACHE/uv-$UV_VERSION/bin/uv"

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
while read -r pkg; do
  [ -z "$pkg" ] || [ "${pkg#\#}" != "$pkg" ] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < <(cat scripts/apt-packages.txt lab/apt-packages.txt)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${missing[*]}; run as root or install them first"; exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$UV" ]; then
  log "installing uv $UV_VERSION into $CACHE"
  mkdir -p "$CACHE"
  python3 -m venv "$CACHE/uv-$UV_VERSION"
  "$CACHE/uv-$UV_VERSION/bin/pip" install -q "uv==$UV_VERSION"
fi

stamp=.venv/.installed
want="$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating .venv from requirements/lock.txt"
  [ -x .venv/bin/python ] || "$UV" venv -q --python python3 .venv
  "$UV" pip sync -q --python .venv/bin/python requirements/lock.txt
  "$UV" pip install -q --python .venv/bin/python --no-deps -e .
  echo "$want" > "$stamp"
fi
vcsim="$(bash lab/vcsim/build.sh)"
log "ready: .venv ($(.venv/bin/python --version)), uv $UV_VERSION, vcsim $vcsim"
