"""Save the lab's blocks into the lab's Prefect (run with the lab's PREFECT_API_URL).

The values come in a 0600 file, never on the command line, since they hold credentials.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import SecretStr

from blocks import NutanixHypervisor, SshIdentity, VsphereHypervisor


def main(request: Path) -> None:
    values = json.loads(request.read_text())
    hv = values["hypervisor"]
    kind = VsphereHypervisor if hv["kind"] == "vsphere" else NutanixHypervisor
    kind(address=hv["address"], user=hv["user"], password=SecretStr(hv["password"]),
         verify_tls=True, ca_bundle=hv["ca_bundle"]).save(hv["name"], overwrite=True)
    ssh = values["ssh"]
    SshIdentity(user=ssh["user"], private_key=SecretStr(ssh["private_key"])).save(
        ssh["name"], overwrite=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
