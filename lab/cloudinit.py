"""The lab's cloud-init: read a VM's metadata and user data the way a guest's cloud-init
would, and turn them into the configuration a lab host boots with.

vSphere hands them over in the VM's extraConfig (`guestinfo.metadata`,
`guestinfo.userdata`, each with an optional `.encoding` of base64 or gzip+base64); the
Nutanix stand-in keeps the user data of the VM's guest customization. A VM without them
boots unreachable, as a real one would: no address, no login.
"""

from __future__ import annotations

import base64
import binascii
import gzip
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import yaml

from lab.hosts import GuestFile, GuestUser, HostConfig

GUESTINFO = ("guestinfo.metadata", "guestinfo.userdata")


class CloudInitError(ValueError):
    """The data is there but unusable; the message says which key and why."""


def decode(value: str, encoding: str | None, key: str) -> str:
    """Decode one guestinfo value the way cloud-init's VMware datasource does."""
    try:
        if encoding in (None, ""):
            return value
        if encoding in ("base64", "b64"):
            return base64.b64decode(value).decode()
        if encoding in ("gzip+base64", "gz+b64"):
            return gzip.decompress(base64.b64decode(value)).decode()
    except (binascii.Error, OSError, UnicodeDecodeError) as error:
        raise CloudInitError(f"{key}: cannot decode as {encoding}: {error}") from None
    raise CloudInitError(f"{key}.encoding: unknown encoding {encoding!r}")


def from_guestinfo(extra_config: Mapping[str, str]) -> tuple[str, str] | None:
    """(metadata, userdata) texts from a VM's extraConfig, or None without cloud-init."""
    if not all(key in extra_config for key in GUESTINFO):
        return None
    metadata, userdata = (decode(extra_config[key], extra_config.get(f"{key}.encoding"), key)
                          for key in GUESTINFO)
    return metadata, userdata


# libyaml's loader where PyYAML has it: each guest boot parses its user data, which
# carries keys and files, on the way to its network coming up.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml(text: str, what: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as error:
        raise CloudInitError(f"{what}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise CloudInitError(f"{what}: expected a mapping")
    return data


def host_config(name: str, metadata_text: str, userdata_text: str, bridge: str) -> HostConfig:
    """The lab host a guest's cloud-init would make of this data."""
    metadata = _yaml(metadata_text, f"{name} metadata")
    if not userdata_text.startswith("#cloud-config"):
        raise CloudInitError(f"{name} userdata: only #cloud-config user data is supported")
    userdata = _yaml(userdata_text, f"{name} userdata")
    try:
        ethernets = metadata["network"]["ethernets"]
        nic = next(iter(ethernets.values()))
        address = IPv4Interface(nic["addresses"][0])
        gateway = next(IPv4Address(r["via"]) for r in nic.get("routes", [])
                       if r.get("to") in ("default", "0.0.0.0/0"))
        dns = tuple(IPv4Address(a) for a in nic.get("nameservers", {}).get("addresses", []))
    except (KeyError, StopIteration, IndexError, TypeError, ValueError) as error:
        raise CloudInitError(f"{name} metadata: no usable static network "
                             f"(addresses, default route): {error!r}") from None
    hostname = str(userdata.get("hostname") or metadata.get("local-hostname") or name)
    users = tuple(
        GuestUser(name=str(user["name"]),
                  ssh_authorized_keys=tuple(user.get("ssh_authorized_keys", [])),
                  sudo=bool(user.get("sudo")),
                  shell=str(user.get("shell", "/bin/bash")))
        for user in userdata.get("users", []) if isinstance(user, dict))
    ssh_keys = userdata.get("ssh_keys", {}) or {}
    host_keys = tuple(
        (kind, str(ssh_keys[f"{kind}_private"]), str(ssh_keys[f"{kind}_public"]))
        for kind in ("ed25519", "ecdsa", "rsa")
        if f"{kind}_private" in ssh_keys and f"{kind}_public" in ssh_keys)
    files = []
    for entry in userdata.get("write_files", []) or []:
        content = str(entry.get("content", ""))
        if entry.get("encoding") in ("b64", "base64"):
            content = base64.b64decode(content).decode()
        files.append(GuestFile(path=str(entry["path"]), content=content,
                               permissions=str(entry.get("permissions", "0644")),
                               owner=str(entry.get("owner", "root:root"))))
    return HostConfig(
        name=name,
        instance_id=str(metadata.get("instance-id", name)),
        hostname=hostname.split(".")[0],
        fqdn=str(userdata.get("fqdn") or hostname),
        address=address,
        gateway=gateway,
        dns=dns,
        bridge=bridge,
        users=users,
        host_keys=host_keys,
        write_files=tuple(files),
    )
