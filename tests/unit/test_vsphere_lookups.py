"""The placement look-ups that a run's vSphere sessions share (blocks.vsphere.VsphereLookups):
made once however many sessions ask at once, handed to each as objects of its own
connection."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pyVmomi import vim

from blocks.vsphere import VsphereLookups


class Stub:
    """Stands for a session's pyVmomi connection; only its identity matters here."""


def test_a_lookup_is_made_once_for_sessions_that_ask_together() -> None:
    lookups = VsphereLookups()
    made: list[int] = []
    gate = threading.Event()

    def make() -> vim.Datacenter:
        gate.wait(5)
        made.append(1)
        time.sleep(0.05)  # the others ask meanwhile: they wait, they do not look up again
        return vim.Datacenter("datacenter-2", Stub())

    stubs = [Stub() for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(lookups.get, "datacenter", stub, make) for stub in stubs]
        gate.set()
        found = [future.result() for future in futures]
    assert made == [1]
    assert [dc._moId for dc in found] == ["datacenter-2"] * 8
    assert all(isinstance(dc, vim.Datacenter) for dc in found)
    assert [dc._stub for dc in found] == stubs  # each bound to the asking session


def test_nested_values_keep_their_shape_and_plain_values_pass_through() -> None:
    lookups = VsphereLookups()
    stub = Stub()
    target = (vim.VirtualMachine("vm-7", Stub()), vim.ResourcePool("resgroup-3", Stub()),
              vim.Datastore("datastore-5", Stub()), vim.Folder("group-v9", Stub()))
    lookups.get("clone target", Stub(), lambda: target)
    again = lookups.get("clone target", stub, lambda: (_ for _ in ()).throw(AssertionError))
    assert [(type(obj), obj._moId, obj._stub) for obj in again] == [
        (vim.VirtualMachine, "vm-7", stub), (vim.ResourcePool, "resgroup-3", stub),
        (vim.Datastore, "datastore-5", stub), (vim.Folder, "group-v9", stub)]
    networks = lookups.get("networks", stub, lambda: {
        "pg-apps": vim.dvs.DistributedVirtualPortgroup("dvportgroup-11", Stub())})
    assert networks["pg-apps"]._moId == "dvportgroup-11" and networks["pg-apps"]._stub is stub
    assert lookups.get("names", stub, lambda: {"dvportgroup-11": "pg-apps"}) == {
        "dvportgroup-11": "pg-apps"}
    assert lookups.get("missing datacenter", stub, lambda: None) is None


def test_a_failed_lookup_is_not_kept() -> None:
    lookups = VsphereLookups()

    def fail() -> object:
        raise RuntimeError("template 'ubuntu' not found")

    for _ in range(2):  # asked again, it is looked up again
        with pytest.raises(RuntimeError, match="ubuntu"):
            lookups.get("clone target", Stub(), fail)
    assert lookups.get("clone target", Stub(), lambda: "found") == "found"
