#!/usr/bin/env bash
# Build the lab's vCenter simulator (lab/vcsim/main.go) from Debian packages only:
# golang-go (Go 1.19) and golang-github-vmware-govmomi-dev (govmomi 0.24.2), GOPATH
# mode, no network besides apt. Idempotent: rebuilds only when the binary is missing
# or main.go, this script, the govmomi package or the Go toolchain changed.
# Prints the binary's path on stdout; everything else goes to stderr.
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${PLATFORM_CACHE:-/var/cache/platform-orchestrator}
W=$CACHE/vcsim-build
BIN=$CACHE/bin/vcsim
PACKAGES=(golang-go golang-github-vmware-govmomi-dev)
GOVMOMI=/usr/share/gocode/src/github.com/vmware/govmomi
MAIN_PKG=platform-orchestrator/vcsim # import path of main.go inside the private GOPATH

log() { echo "vcsim-build: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "missing packages ${missing[*]} and not root"
        sudo=(sudo)
    fi
    log "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# pyvmomi >= 8 reads properties through Fetch; in 0.24.2 Fetch indexes MissingSet[0]
# even for a property that is merely unset, which panics (fixed upstream in v0.36,
# govmomi#3337). Answer with an empty result instead, like vCenter.
patch_fetch() {
    local f=$1/simulator/property_collector.go
    awk '
        prev ~ /^[ \t]*if len\(obj\.PropSet\) == 0 \{[ \t]*$/ &&
        $0 ~ /^[ \t]*fault := obj\.MissingSet\[0\]\.Fault[ \t]*$/ {
            print "\t\t// platform-orchestrator: an unset property is neither in PropSet nor in MissingSet."
            print "\t\tif len(obj.MissingSet) == 0 {"
            print "\t\t\tbody.Res = new(internal.FetchResponse)"
            print "\t\t\treturn body"
            print "\t\t}"
            n++
        }
        { print; prev = $0 }
        END { if (n != 1) exit 3 }
    ' "$f" >"$f.patched" || die "Fetch patch target not found in $f (govmomi changed?)"
    mv "$f.patched" "$f"
}

install_packages
[[ -d $GOVMOMI/simulator ]] || die "$GOVMOMI/simulator missing after install"
export PATH=/usr/lib/go/bin:$PATH # golang-go's toolchain, even if another go comes first

# Everything that determines the binary.
inputs=$(
    sha256sum "$HERE/main.go" "${BASH_SOURCE[0]}" | cut -d' ' -f1
    dpkg-query -W -f='${Package} ${Version}\n' "${PACKAGES[@]}"
    go version
)
stamp=$(sha256sum <<<"$inputs" | cut -d' ' -f1)

mkdir -p "$W" "$(dirname "$BIN")"
exec 9>"$W/.lock"
flock 9 # one build at a time; a second caller waits, then finds the stamp fresh

if [[ -x $BIN && -f $W/stamp && $(<"$W/stamp") == "$stamp" ]]; then
    log "up to date"
    echo "$BIN"
    exit 0
fi

log "building (inputs sha256 $stamp)"
start=$SECONDS
rm -rf "$W/gopath" "$W/gocache" "$W/stamp"
src=$W/gopath/src/github.com/vmware/govmomi
mkdir -p "$(dirname "$src")" "$W/gopath/src/$MAIN_PKG"
cp -a "$GOVMOMI" "$src" # fresh pristine copy, so the patch always applies once
patch_fetch "$src"
cp "$HERE/main.go" "$W/gopath/src/$MAIN_PKG/main.go"

export GO111MODULE=off GOPATH=$W/gopath:/usr/share/gocode GOCACHE=$W/gocache \
    GOFLAGS= GOPROXY=off CGO_ENABLED=0
trap 'rm -rf "$W/gocache"' EXIT

# The private (patched) copy must shadow the packaged one.
dir=$(go list -f '{{.Dir}}' github.com/vmware/govmomi/simulator)
[[ $dir == "$src/simulator" ]] || die "go resolves the simulator to $dir, not the patched copy"

go build -trimpath -ldflags='-s -w' -o "$W/vcsim.new" "$MAIN_PKG"
install -m 0755 "$W/vcsim.new" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN" # atomic: a running simulator keeps its old inode
rm -f "$W/vcsim.new"
echo "$stamp" >"$W/stamp"

log "built in $((SECONDS - start)) s, $(du -h "$BIN" | cut -f1)"
echo "$BIN"
