#!/usr/bin/python3 -I
"""`chronyd` inside a lab host: chrony that never steers the machine's clock.

LAB STAND-IN, bind-mounted read-only over /usr/sbin/chronyd in every lab host by its PID 1
(lab/host_init.py). The system clock is global: a chronyd in a lab host would set and slew
the machine's clock. This runs the real chronyd (kept at /run/lab-host/real/chronyd) with
`-x` added, chrony's own "do not control the system clock" mode: it reads its
configuration, serves chronyc (`chronyc tracking`, `chronyc sources`), measures its
sources and estimates the clock's offset, but never adjusts it. The lab has no NTP server,
so its sources stay unreachable. The host's processes also lack CAP_SYS_TIME.

Debian's chrony.service starts chronyd as root (`ExecStart=!/usr/sbin/chronyd`, chronyd
then drops to _chrony itself), but the lab's systemctl (docker-systemctl-replacement)
ignores the `!` and starts it as `User=_chrony`. Started that way, this adds `-U` too
(chrony's "do not insist on root"), so the unit still runs. The difference then: chronyd
cannot bind its UDP command port 323, so `chronyc` works for root (Unix socket) but not
for other users, and `systemctl is-active chrony` says "active" only to root (the PID
file is in /run/chrony, mode 0700).
"""

import os
import sys

REAL = "/run/lab-host/real/chronyd"

if __name__ == "__main__":
    args = sys.argv[1:]
    extra = [] if "-x" in args else ["-x"]
    if os.getuid() != 0 and "-U" not in args:
        extra.append("-U")
    os.execv(REAL, ["/usr/sbin/chronyd", *extra, *args])
