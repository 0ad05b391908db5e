"""The stress tool's command line: figures as JSON, exit codes 0/1/2."""

from __future__ import annotations

import json

import pytest
import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)


def test_json_output_and_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """`torture --json` prints one versioned JSON object with the figures and exits 0."""
    rc = stress.main(["torture", "-d", "1", "-p", "2", "--seed", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["version"] == 1
    (res,) = out["results"]
    assert res["scenario"] == "torture" and res["ok"] is True
    assert res["figures"]["torn_reads"] == 0 and res["figures"]["ops"] > 0


def test_failure_exits_one(capsys: pytest.CaptureFixture[str]) -> None:
    """A run that finds a broken promise exits 1 and names the problem (via a fake scenario)."""

    def broken(opt: stress.Options) -> stress.Result:
        r = stress.Result("torture")
        r.fail("1 torn read")
        return r

    saved = stress.RUNNERS["torture"]
    stress.RUNNERS["torture"] = broken
    try:
        rc = stress.main(["torture", "-q"])
    finally:
        stress.RUNNERS["torture"] = saved
    assert rc == 1
    assert "torture: FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["nonsense"],
        ["torture", "-p", "1"],
        ["kill", "-d", "0"],
        ["torture", "--engines", "both"],
        ["kill", "--min-kills", "-1"],
    ],
)
def test_bad_usage_exits_two(argv: list[str]) -> None:
    """Unknown scenarios and impossible options are usage errors (exit 2)."""
    with pytest.raises(SystemExit) as e:
        stress.main(argv)
    assert e.value.code == 2


def test_help_lists_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """--help names every scenario."""
    with pytest.raises(SystemExit):
        stress.main(["--help"])
    out = capsys.readouterr().out
    for name in stress.SCENARIOS:
        assert name in out
