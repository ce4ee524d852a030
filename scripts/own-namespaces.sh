#!/usr/bin/env bash
# Run a command (the test suite, the benchmarks) in a network namespace and a /run of its
# own. A lab's bridges, addresses, route, nftables table and /run/netns names are global to
# a network namespace and a /run: without this, `make test` refused to start while the lab
# of `make lab` was up, or when a killed run had left its bridges behind. Inside, every
# lab the tests start is private to the command and goes with it; the lab outside is not
# touched. Files (the build cache, /tmp) are shared: nothing the tests write there clashes.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG...]" >&2
  exit 2
fi
if [ "${PLATFORM_OWN_NAMESPACES:-}" != "$$" ]; then
  # unshare and env exec in place, so this PID marks the namespaces made for this run (a
  # value inherited from elsewhere never matches: /run outside is never mounted over).
  exec unshare --net --mount --propagation private env PLATFORM_OWN_NAMESPACES=$$ "$0" "$@"
fi

ip link set lo up
mount -t tmpfs -o mode=0755,size=64m platform-run /run
mkdir -p /run/netns /run/lock /run/sshd
chmod 1777 /run/lock
exec "$@"
