"""A lab for integration tests and benchmarks: the simulated datacenter plus a Prefect test
server holding the lab's blocks, torn down completely at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from pydantic import SecretStr

from blocks.ssh import SshIdentity
from blocks.vsphere import VsphereHypervisor
from lab.lab import Lab
from lab.prefect_stack import PrefectStack
from lab.ssh_keys import ensure_identity
from sizing.inventory import build_inventory
from sizing.spec import PlatformSpec
from tasks import host_keys
from tasks.spec import read_spec
from tests.conftest import LAB_SPEC, exclusive_lab


def lab_root() -> Path:
    """A fresh directory for a lab's state that the lab's PostgreSQL, which runs as its own
    system user, can enter (under /tmp, mode 0711); the caller removes it."""
    root = Path(tempfile.mkdtemp(prefix="lab-"))
    root.chmod(0o711)
    return root


@contextmanager
def lab_with_prefect(spec_path: str | Path, vcsim_port: int,
                     vcsim_args: tuple[str, ...] = (), *,
                     prefect_on_postgres: bool = False) -> Iterator[Lab]:
    """The lab for ``spec_path`` (vSphere), its blocks saved as the spec names them, in a
    Prefect test harness (SQLite), or with ``prefect_on_postgres`` in the lab's own Prefect
    server on PostgreSQL as `make lab` runs it; each caller picks its own vcsim port."""
    spec = read_spec(spec_path)
    with exclusive_lab():  # first: a refusal leaves no directory and no setting behind
        root = lab_root()
        state = root / "state"
        previous = os.environ.get("PLATFORM_LAB_VCSIM_PORT")
        os.environ["PLATFORM_LAB_VCSIM_PORT"] = str(vcsim_port)
        lab = Lab(str(spec_path), spec, state_dir=state,
                  prefect=PrefectStack(state_dir=state, port=vcsim_port - 14000))
        try:
            if vcsim_args:
                lab.vcsim.up(spec, vcsim_args)
            lab.up(with_prefect=False)
            with ExitStack() as prefect:
                if prefect_on_postgres:
                    lab.prefect.serve()
                    prefect.enter_context(temporary_settings({PREFECT_API_URL:
                                                              lab.prefect.api_url}))
                else:
                    prefect.enter_context(prefect_test_harness(server_startup_timeout=60))
                access = lab.vcsim.access()
                assert access is not None
                VsphereHypervisor(address=access.address, user=access.user,
                                  password=SecretStr(access.password),
                                  ca_bundle=access.ca_file.read_text()).save(
                    spec.hypervisor.block, overwrite=True)
                key = ensure_identity(state / "ssh")
                SshIdentity(user=spec.ssh.user, private_key=SecretStr(key.read_text())).save(
                    spec.ssh.identity_block, overwrite=True)
                yield lab
        finally:
            lab.down()
            if previous is None:
                os.environ.pop("PLATFORM_LAB_VCSIM_PORT", None)
            else:
                os.environ["PLATFORM_LAB_VCSIM_PORT"] = previous
            shutil.rmtree(root, ignore_errors=True)


def delete_all_vms(lab: Lab, spec: PlatformSpec, timeout: float = 60.0) -> None:
    """Delete every VM on the spec's hypervisor and wait until their lab hosts are gone."""
    from tasks.vms import open_hypervisor

    session = open_hypervisor(spec)
    try:
        for vm in session.list_vms():
            session.delete_vm(vm.name)
    finally:
        session.close()
    deadline = time.monotonic() + timeout
    while lab.hosts.names():
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab hosts still up {timeout:.0f} s after their VMs were "
                               f"deleted: {lab.hosts.names()}")
        time.sleep(0.2)


@contextmanager
def prepared_lab(vcsim_port: int, spec_path: Path = LAB_SPEC) -> Iterator[Lab]:
    """`lab_with_prefect` after phases 1 and 2: every VM made, booted and prepared."""
    from flows.prepare import prepare_vms
    from flows.provision import provision_vms
    count = len(build_inventory(read_spec(spec_path)).vms)
    with lab_with_prefect(spec_path, vcsim_port=vcsim_port) as lab:
        assert provision_vms(spec_path=str(spec_path)).created == count
        assert prepare_vms(spec_path=str(spec_path)).changed == count
        yield lab


def ssh(lab: Lab, spec: PlatformSpec, vm_name: str, command: str, *, user: str | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The OpenSSH client as an admin would use it: the lab's key, the host keys phase 1
    stored (strict checking), ``user`` defaulting to the spec's admin user."""
    inventory = build_inventory(spec)
    vm = inventory.by_name(vm_name)
    known = lab.state_dir / "known_hosts"
    known.write_text("".join(f"{v.ip} {host_keys.public_key(spec, v)}\n"
                             for v in inventory.vms))
    return subprocess.run(
        ["ssh", "-i", str(lab.state_dir / "ssh" / "id_ed25519"), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "ConnectTimeout=5",
         f"{user or spec.ssh.user}@{vm.ip}", command],
        input=stdin, capture_output=True, text=True, timeout=60, check=False)
