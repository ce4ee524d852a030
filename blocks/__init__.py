"""Prefect Block types: the credentials and the client of each external system.

`prefect block register -m blocks` registers every type listed here.
"""

from blocks.gogs import GogsServer
from blocks.nutanix import NutanixHypervisor
from blocks.ssh import SshIdentity
from blocks.vault import VaultServer
from blocks.vsphere import VsphereHypervisor

__all__ = ["GogsServer", "NutanixHypervisor", "SshIdentity", "VaultServer", "VsphereHypervisor"]
