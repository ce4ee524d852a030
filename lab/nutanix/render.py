"""Stored entities as the JSON Prism Central v4 returns for them.

What Prism leaves out is left out too: a VM read back has no `guestCustomization`
(cloud-init is consumed at creation), and a creation task names its VM only once it has
succeeded. Every nested object carries its `$objectType`, which the SDK needs to pick a
model class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lab.nutanix.wire import link, timestamp, typed

JSON = dict[str, Any]
AHV = "vmm.v4.ahv.config."


def _ipv4(value: str) -> JSON:
    return typed("common.v1.config.IPv4Address", "v1.0", {"value": value, "prefixLength": 32})


def render_vm(vm: Mapping[str, Any], version: str, base_url: str) -> JSON:
    """A stored VM as `vmm.v4.ahv.config.Vm` JSON for API `version`."""

    def t(kind: str, body: JSON) -> JSON:
        return typed(AHV + kind, version, body)

    disks = []
    for d in vm["disks"]:
        backing: JSON = {"diskExtId": d["diskExtId"], "diskSizeBytes": d["sizeBytes"],
                         "storageContainer": t("VmDiskContainerReference",
                                               {"extId": d["containerExtId"]}),
                         "isMigrationInProgress": False}
        if d.get("imageExtId"):
            backing["dataSource"] = t("DataSource", {
                "reference": t("ImageReference", {"imageExtId": d["imageExtId"]})})
        disks.append(t("Disk", {
            "extId": d["extId"],
            "diskAddress": t("DiskAddress", {"busType": d["busType"], "index": d["index"]}),
            "backingInfo": t("VmDisk", backing)}))
    nics = []
    for n in vm["nics"]:
        network: JSON = {"nicType": "NORMAL_NIC", "vlanMode": "ACCESS",
                         "shouldAllowUnknownMacs": False,
                         "subnet": t("SubnetReference", {"extId": n["subnetExtId"]})}
        if n.get("ipAddress") or n.get("shouldAssignIp") is not None:
            config: JSON = {}
            if n.get("shouldAssignIp") is not None:
                config["shouldAssignIp"] = n["shouldAssignIp"]
            if n.get("ipAddress"):
                config["ipAddress"] = _ipv4(n["ipAddress"])
            network["ipv4Config"] = t("Ipv4Config", config)
        network["ipv4Info"] = t("Ipv4Info", {
            "learnedIpAddresses": [_ipv4(ip) for ip in n.get("learnedIps") or []]})
        backing = {"model": n["model"], "macAddress": n["macAddress"],
                   "isConnected": n["isConnected"], "numQueues": 1}
        nics.append(t("Nic", {
            "extId": n["extId"],
            "backingInfo": t("EmulatedNic", dict(backing)),
            "nicBackingInfo": t("VirtualEthernetNic", dict(backing)),
            "networkInfo": t("NicNetworkInfo", dict(network)),
            "nicNetworkInfo": t("VirtualEthernetNicNetworkInfo", dict(network))}))
    body: JSON = {
        "extId": vm["extId"], "name": vm["name"],
        "createTime": timestamp(vm["createTime"]), "updateTime": timestamp(vm["updateTime"]),
        "numSockets": vm["numSockets"], "numCoresPerSocket": vm["numCoresPerSocket"],
        "numThreadsPerCore": vm["numThreadsPerCore"], "memorySizeBytes": vm["memorySizeBytes"],
        "powerState": vm["powerState"], "machineType": vm["machineType"],
        "biosUuid": vm["biosUuid"], "generationUuid": vm["generationUuid"],
        "hardwareClockTimezone": "UTC", "isAgentVm": False,
        "cluster": t("ClusterReference", {"extId": vm["clusterExtId"]}),
        "disks": disks, "nics": nics,
        "links": [link(f"{base_url}/api/vmm/{version}/ahv/config/vms/{vm['extId']}", "self")]}
    if vm.get("hostExtId"):
        body["host"] = t("HostReference", {"extId": vm["hostExtId"]})
    body.update(vm.get("extra") or {})
    return t("Vm", body)


def render_image(image: Mapping[str, Any], all_clusters: list[str], owner: str,
                 version: str, base_url: str) -> JSON:
    """A `vmm.v4.content.Image`; an image without placement is on every cluster."""
    return typed("vmm.v4.content.Image", version, {
        "extId": image["extId"], "name": image["name"], "description": "",
        "type": image["type"], "sizeBytes": image["sizeBytes"],
        "clusterLocationExtIds": list(image["clusterExtIds"]) or all_clusters,
        "createTime": timestamp(image["createTime"]),
        "lastUpdateTime": timestamp(image["createTime"]), "ownerName": owner,
        "links": [link(f"{base_url}/api/vmm/{version}/content/images/{image['extId']}",
                       "self")]})


def render_subnet(subnet: Mapping[str, Any], cluster_name: str | None, version: str,
                  base_url: str) -> JSON:
    """A `networking.v4.config.Subnet`: a basic VLAN subnet without IP address management."""
    return typed("networking.v4.config.Subnet", version, {
        "extId": subnet["extId"], "name": subnet["name"], "subnetType": "VLAN",
        "networkId": subnet["vlanId"], "clusterReference": subnet["clusterExtId"],
        "clusterName": cluster_name, "isExternal": False, "isNatEnabled": False,
        "isAdvancedNetworking": False, "bridgeName": "br0", "hypervisorType": "acropolis",
        "links": [link(f"{base_url}/api/networking/{version}/config/subnets/"
                       f"{subnet['extId']}", "self")]})


def render_cluster(cluster: Mapping[str, Any], vm_count: int, version: str, base_url: str, *,
                   central: bool = False) -> JSON:
    """A `clustermgmt.v4.config.Cluster`; `central` renders Prism Central's own entry."""
    def t(kind: str, body: JSON) -> JSON:
        return typed(f"clustermgmt.v4.config.{kind}", version, body)

    hosts = [] if central else list(cluster["hostExtIds"])
    return t("Cluster", {
        "extId": cluster["extId"], "name": cluster["name"],
        "config": t("ClusterConfigReference", {
            "clusterFunction": ["PRISM_CENTRAL"] if central else ["AOS"],
            "hypervisorTypes": [] if central else ["AHV"], "isAvailable": True,
            "redundancyFactor": 1 if central else 2,
            "buildInfo": t("BuildReference", {"version": "7.3", "buildType": "release"})}),
        "nodes": t("NodeReference", {
            "numberOfNodes": max(len(hosts), 1),
            "nodeList": [t("NodeListItemReference", {"nodeUuid": h}) for h in hosts]}),
        "vmCount": vm_count,
        "links": [link(f"{base_url}/api/clustermgmt/{version}/config/clusters/"
                       f"{cluster['extId']}", "self")]})


def render_container(cluster: Mapping[str, Any], version: str, base_url: str) -> JSON:
    """The cluster's one storage container (`clustermgmt.v4.config.StorageContainer`)."""
    ext_id = cluster["containerExtId"]
    return typed("clustermgmt.v4.config.StorageContainer", version, {
        "extId": ext_id, "containerExtId": ext_id,
        "name": f"default-container-{int(ext_id.replace('-', ''), 16) % 10**14}",
        "clusterExtId": cluster["extId"], "clusterName": cluster["name"],
        "maxCapacityBytes": cluster["storageBytes"], "replicationFactor": 2,
        "isMarkedForRemoval": False, "isInternal": False, "isEncrypted": False,
        "links": [link(f"{base_url}/api/clustermgmt/{version}/config/storage-containers/"
                       f"{ext_id}", "self")]})


def render_task(task: Mapping[str, Any], status: str, now: float, version: str,
                base_url: str) -> JSON:
    """A `prism.v4.config.Task` at time `now` (progress and times follow the clock)."""
    def t(kind: str, body: JSON) -> JSON:
        return typed(f"prism.v4.{kind}", version, body)

    result = task["result"]
    if result is not None:
        entities = result["entities"]
    elif task["kind"] != "create_vm" and task["vmExtId"]:
        entities = [{"extId": task["vmExtId"], "rel": "vmm:ahv:config:vm"}]
    else:
        entities = []
    if status == "QUEUED":
        progress = 0
    elif result is None:
        span = max(task["endAt"] - task["startAt"], 1e-6)
        progress = min(max(int((now - task["startAt"]) / span * 100), 1), 99)
    else:
        progress = 100
    body: JSON = {
        "extId": task["extId"], "operation": task["operation"],
        "operationDescription": task["operationDescription"],
        "createdTime": timestamp(task["createdAt"]),
        "lastUpdatedTime": timestamp(min(now, task["endAt"])),
        "status": status, "progressPercentage": progress, "isCancelable": False,
        "isBackgroundTask": False, "numberOfSubtasks": 0,
        "numberOfEntitiesAffected": len(entities),
        "entitiesAffected": [t("config.EntityReference", e) for e in entities],
        "clusterExtIds": [task["clusterExtId"]] if task["clusterExtId"] else [],
        "ownedBy": t("config.OwnerReference", {"name": task["owner"]}),
        "appName": "vmm"}
    if status != "QUEUED":
        body["startedTime"] = timestamp(task["startAt"])
    if result is not None:
        body["completedTime"] = timestamp(task["endAt"])
    if result is not None and result["error"]:
        error = result["error"]
        body["errorMessages"] = [t("error.AppMessage", {
            "message": error["message"], "severity": "ERROR", "code": error["code"],
            "locale": "en-US", "errorGroup": error["group"],
            "argumentsMap": error["arguments"]})]
        body["legacyErrorMessage"] = error["message"]
    body["links"] = [link(f"{base_url}/api/prism/{version}/config/tasks/{task['extId']}",
                          "self")]
    return t("config.Task", body)
