#!/usr/bin/env bash
# Run a command (the test suite, the benchmarks) in a network namespace, a /sys and a /run
# of its own. A lab's bridges, addresses, route, nftables table and /run/netns names are
# global to a network namespace and a /run: without this, `make test` refused to start
# while the lab of `make lab` was up, or when a killed run had left its bridges behind.
# Inside, every lab the tests start is private to the command and goes with it; the lab
# outside is not touched. Files (the build cache, /tmp) are shared: nothing the tests
# write there clashes.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG...]" >&2
  exit 2
fi
if [ "${PLATFORM_OWN_NAMESPACES:-}" != "$$" ]; then
  # unshare and env exec in place, so this PID marks the namespaces made for this run (a
  # value inherited from elsewhere never matches: /run outside is never mounted over).
  # fd 9 carries the machine's network namespace in (see /run/platform-machine-netns).
  exec 9</proc/self/ns/net
  exec unshare --net --mount --propagation private env PLATFORM_OWN_NAMESPACES=$$ "$0" "$@"
fi

ip link set lo up
# A sysfs mounted in this namespace lists this namespace's network devices (the lab checks
# its bridges in /sys/class/net); the machine's cgroup mounts are moved onto it unchanged.
cgroups=""
if mountpoint -q /sys/fs/cgroup; then
  cgroups=$(mktemp -d)
  mount --rbind /sys/fs/cgroup "$cgroups"
fi
mount -t sysfs platform-sys /sys
if [ -n "$cgroups" ]; then
  mount --move "$cgroups" /sys/fs/cgroup
  rmdir "$cgroups"
fi
mount -t tmpfs -o mode=0755,size=64m platform-run /run
mkdir -p /run/netns /run/lock /run/sshd
chmod 1777 /run/lock
# The machine's network namespace, for the lab's look at the sysctls only it has
# (lab/hosts.py, initial_net_sysctls): lab hosts copy them as a VM's kernel has them.
touch /run/platform-machine-netns
mount --bind /proc/self/fd/9 /run/platform-machine-netns
exec 9<&-
exec "$@"
