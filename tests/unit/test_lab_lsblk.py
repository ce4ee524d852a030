"""The lab hosts' lsblk stand-in reads its options as util-linux does (getopt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.guest import lsblk


@pytest.fixture()
def os_disk_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disks = tmp_path / "disks.json"
    disks.write_text(json.dumps([{"name": "sda", "os": True, "size": 60 * 2**30}]))
    monkeypatch.setattr(lsblk, "DISKS_FILE", str(disks))


def _out(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = lsblk.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.usefixtures("os_disk_only")
@pytest.mark.parametrize("grouped, separate", [
    (["-dnl", "-o", "NAME,TYPE"], ["-d", "-n", "-l", "-o", "NAME,TYPE"]),
    (["-no", "NAME,SIZE"], ["-n", "-o", "NAME,SIZE"]),
    (["-bnoNAME,SIZE"], ["-b", "-n", "-o", "NAME,SIZE"]),
])
def test_grouped_short_options_mean_the_same_as_separate_ones(
        grouped: list[str], separate: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    expected = _out(separate, capsys)
    assert expected[0] == 0 and expected[1].startswith("sda")
    assert _out(grouped, capsys) == expected


@pytest.mark.usefixtures("os_disk_only")
def test_an_unknown_letter_in_a_group_is_refused_by_name(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _out(["-dx"], capsys)
    assert (code, out) == (1, "")
    assert err == "lsblk (lab stand-in): option -x is not simulated\n"


def test_splitting_leaves_long_options_and_values_alone() -> None:
    assert lsblk.split_short(["--output=NAME", "-oNAME", "-J", "/dev/sdb"]) == \
        ["--output=NAME", "-oNAME", "-J", "/dev/sdb"]
    assert lsblk.split_short(["-pJ"]) == ["-p", "-J"]
