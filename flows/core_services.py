"""Phase 3: Vault, the private registry, the HAProxy + keepalived pairs and Gogs."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import PhaseFailed, PhaseResult, publish_plan, start_phase
from sizing.tiers import Role
from tasks.gogs import ensure_gogs
from tasks.load_balancers import ensure_load_balancer
from tasks.prepare import ssh_pool
from tasks.registry import ensure_registry
from tasks.spec import DEFAULT_SPEC, read_images, resolve_spec_path
from tasks.vault import (
    OPERATOR_WAIT_SECONDS,
    configure_vault,
    install_vault,
    operator_keys,
    unseal_vault,
)

_POOL: Any = ThreadPoolTaskRunner(max_workers=16)
IMAGES_FILE = "images.txt"
_BALANCERS = (Role.LBLAN, Role.LBDMZ, Role.LBINTEGRATION)
# Artifact key -> the services (table rows) it shows.
_ARTIFACTS = {"vault": ("vault", "vault-config"), "registry": ("registry",),
              "load-balancers": ("load-balancer",), "gogs": ("gogs",)}


@flow(name="core-services", task_runner=_POOL)
def core_services(spec_path: str = DEFAULT_SPEC, plan_only: bool = False,
                  operator_wait_seconds: float = OPERATOR_WAIT_SECONDS) -> PhaseResult:
    """Vault first (its PKI and secrets serve the rest), then the registry, the load
    balancer pairs and Gogs in parallel.

    One service failing does not stop the others of its step; the phase then fails naming
    each. With ``plan_only`` it publishes what it would do and changes nothing.
    """
    logger = get_run_logger()
    _, spec, inventory = start_phase(3, spec_path)
    if plan_only:
        return publish_plan(3, spec, inventory)
    spec_dir = resolve_spec_path(spec_path).resolve().parent
    # What is read from files fails here, before any change: the operators' keys and the
    # release's image list (deployments/<env>/images.txt, beside the spec).
    if spec.vault.unseal == "operators":
        operator_keys(spec, spec_dir)
    images_path = spec_dir / IMAGES_FILE
    if not images_path.is_file():
        raise FileNotFoundError(f"{images_path} does not exist: list the images of this "
                                f"release there, one `name:tag@sha256:<digest>` per line")
    read_images(images_path)

    rows: list[dict[str, object]] = []
    failures: dict[str, BaseException] = {}
    with ssh_pool(spec) as pool:
        rows.append(install_vault(spec, inventory, pool))
        unsealed = unseal_vault(spec, inventory, pool, spec_dir=str(spec_dir),
                                wait_seconds=operator_wait_seconds)
        rows[-1]["changed"] = ", ".join(
            part for part in (str(rows[-1]["changed"]),
                              "initialised" if unsealed["initialised"] else "",
                              "unsealed" if unsealed["unsealed"] else "") if part)
        rows.append(configure_vault(spec, inventory, pool))

        gitops = inventory.of_role(Role.GITOPS)[0].name
        futures = {("registry", gitops): ensure_registry.submit(spec, inventory, pool,
                                                                 str(images_path)),
                   ("gogs", gitops): ensure_gogs.submit(spec, inventory, pool)}
        for role in _BALANCERS:
            for vm in inventory.of_role(role):
                futures[("load-balancer", vm.name)] = ensure_load_balancer.submit(
                    spec, inventory, vm.name, pool)
        for (service, host), future in futures.items():
            try:
                rows.append(future.result())
            except Exception as error:
                failures[f"{service} on {host}"] = error
                rows.append({"service": service, "host": host, "endpoint": "", "version": "",
                             "changed": f"FAILED: {str(error).splitlines()[0]}",
                             "seconds": None})

    for row in rows:
        row["action"] = "failed" if str(row["changed"]).startswith("FAILED") else \
            "changed" if row["changed"] else "unchanged"
    counts = {action: sum(1 for row in rows if row["action"] == action)
              for action in ("changed", "unchanged", "failed")}
    columns = ("service", "host", "endpoint", "version", "action", "changed", "seconds")
    create_table_artifact(
        key="phase-3-core-services",
        table=[{key: row[key] for key in columns} for row in rows],
        description="Phase 3, core services: " +
                    ", ".join(f"{n} {a}" for a, n in counts.items()))
    # One table per service too, so each has its own page in the UI.
    for key, services in _ARTIFACTS.items():
        mine = [{k: row[k] for k in columns} for row in rows if row["service"] in services]
        create_table_artifact(
            key=f"phase-3-{key}", table=mine,
            description=f"Phase 3, {key}: " + ", ".join(
                f"{row['host']} {row['action']}" for row in mine))
    if failures:
        raise PhaseFailed(f"phase 3: {len(failures)} services failed:\n" + "\n".join(
            f"  {name}: {error}" for name, error in failures.items()))
    if not counts["changed"]:
        logger.info("all %d core services match the spec: nothing changed",
                    counts["unchanged"])
    return PhaseResult(phase=3, name="core-services", changed=counts["changed"],
                       unchanged=counts["unchanged"])
