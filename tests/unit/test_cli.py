"""`platformctl validate | plan | schema` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from platformctl.cli import main, schema_text
from tests.conftest import LAB_SPEC, ROOT


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(LAB_SPEC)]) == 0
    assert "valid: lab, 100 users, 18 VMs on vsphere" in capsys.readouterr().out


def test_validate_invalid_exits_1_with_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "tests" / "data" / "invalid" / "01-unknown-tier.yaml"
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:7: users: 250 is not a sizing tier" in err


def test_validate_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 1
    assert "absent.yaml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("users", [None, 500, 1000, 10000])
def test_plan_json_is_stable_across_tiers(users: int | None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", str(LAB_SPEC), "--format", "json"]
    assert main(args + (["--users", str(users)] if users else [])) == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["inventory"]
    columns = {"name", "role", "cluster", "zone", "ip", "vcpu", "memory_gb", "disks_gb"}
    assert columns <= set(rows[0])
    assert [p["phase"] for p in document["phases"]] == list(range(1, 10))
    assert main(["plan", str(LAB_SPEC), "--format", "json"]) == 0
    base = {r["name"]: r["ip"] for r in json.loads(capsys.readouterr().out)["inventory"]}
    assert base.items() <= {r["name"]: r["ip"] for r in rows}.items()


def test_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(LAB_SPEC)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lab: 100 concurrent users on vsphere: 18 VMs")
    assert "Phase 9 applications (Business applications): 4 items" in out


def test_plan_rejects_unknown_tier() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan", str(LAB_SPEC), "--users", "300"])
    assert exited.value.code == 2


def test_committed_schema_is_current() -> None:
    committed = (ROOT / "deployments" / "platform.schema.json").read_text()
    assert committed == schema_text(), "run `make schema` to refresh it"
    schema = json.loads(committed)
    assert schema["additionalProperties"] is False
    assert {"name", "domain", "users", "hypervisor", "zones"} <= set(schema["required"])


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "platformctl"
    done = subprocess.run([str(exe), "validate", str(LAB_SPEC)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
