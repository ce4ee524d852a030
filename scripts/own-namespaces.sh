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

# fd 9 carries the machine's network namespace in (see /run/platform-machine-netns).
exec 9</proc/self/ns/net
# What follows runs inside the new namespaces only: the machine's /sys and /run are never
# mounted over.
exec unshare --net --mount --propagation private bash -euo pipefail -c '
ip link set lo up
# A sysfs mounted in this namespace lists the network devices of this namespace (the lab
# checks its bridges in /sys/class/net); the cgroup mounts of the machine move onto it.
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
# The network namespace of the machine, where the lab reads the sysctls only it has
# (lab/hosts.py, initial_net_sysctls): lab hosts copy them as the kernel of a VM has them.
touch /run/platform-machine-netns
mount --bind /proc/self/fd/9 /run/platform-machine-netns
exec 9<&-
exec "$@"
' own-namespaces "$@"
