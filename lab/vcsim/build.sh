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
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Replace the one line of file $1 that matches the awk regex $2 with the text on stdin;
# $3 names the patch in the error if that line is not there exactly once.
replace_line() {
    local f=$1
    PATTERN=$2 TEXT=$(cat) awk '
        $0 ~ ENVIRON["PATTERN"] { print ENVIRON["TEXT"]; n++; next }
        { print }
        END { if (n != 1) exit 3 }
    ' "$f" >"$f.patched" || die "$3: patch target not found in $f (govmomi changed?)"
    mv "$f.patched" "$f"
}

# pyvmomi >= 8 reads properties through Fetch; in 0.24.2 Fetch indexes MissingSet[0]
# even for a property that is merely unset, which panics (fixed upstream in v0.36,
# govmomi#3337). Answer with an empty result instead, like vCenter.
patch_fetch() {
    replace_line "$1/simulator/property_collector.go" \
        '^[ \t]*fault := obj\.MissingSet\[0\]\.Fault[ \t]*$' "Fetch patch" <<'EOF'
		// platform-orchestrator: an unset property is neither in PropSet nor in MissingSet.
		if len(obj.MissingSet) == 0 {
			body.Res = new(internal.FetchResponse)
			return body
		}
		fault := obj.MissingSet[0].Fault
EOF
}

# CloneVM_Task hands the template's own device objects to the clone (and blanks the
# disk's file name on them): parallel clones of one template then race on one disk
# backing, and a clone's disk can point at no file (FileNotFound on the next reconfigure;
# upstream copies the devices in later releases). Give each clone a copy, as vCenter
# gives each clone its own disks.
patch_clone_devices() {
    replace_line "$1/simulator/virtual_machine.go" \
        '^[ \t]*devices := vm\.Config\.Hardware\.Device[ \t]*$' "clone patch" <<'EOF'
		// platform-orchestrator: the clone gets copies, never the template's devices.
		var copied types.ArrayOfVirtualDevice
		deepCopy(&types.ArrayOfVirtualDevice{VirtualDevice: vm.Config.Hardware.Device}, &copied)
		devices := copied.VirtualDevice
EOF
}

# WaitForUpdatesEx hands out changes only on a 250 ms tick, so whoever follows vcsim (the
# lab's guests, noticing a power-on) lags a quarter second behind it; vCenter answers as
# soon as a change is there. A 20 ms tick keeps vcsim's batching at a tenth of the lag.
patch_update_tick() {
    replace_line "$1/simulator/property_collector.go" \
        '^[ \t]*ticker := time\.NewTicker\(250 \* time\.Millisecond\)' "tick patch" <<'EOF'
	// platform-orchestrator: 20 ms, not 250 (vCenter sends changes at once).
	ticker := time.NewTicker(20 * time.Millisecond)
EOF
}

# A destroyed property collector stays registered for every object change in 0.24.2: its
# update list grows for ever and every change costs more (one per waiting client ever
# made). Unregister it, as vCenter frees a destroyed collector.
patch_destroy_collector() {
    replace_line "$1/simulator/property_collector.go" \
        '^[ \t]*pc\.CancelWaitForUpdates\(&types\.CancelWaitForUpdates\{This: c\.This\}\)[ \t]*$' \
        "collector patch" <<'EOF'
	pc.CancelWaitForUpdates(&types.CancelWaitForUpdates{This: c.This})
	ctx.Map.RemoveHandler(pc) // platform-orchestrator: a destroyed collector hears no more.
EOF
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
patch_clone_devices "$src"
patch_update_tick "$src"
patch_destroy_collector "$src"
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
