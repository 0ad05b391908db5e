"""shmdisk.testing: the pytest plugin run for real in a subprocess, and its helpers."""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

import shmdisk
from shmdisk.testing import LeakedSegmentsError, _freeze, _overlay, assert_no_leaks, unique_name

EXAMPLES = pathlib.Path(__file__).parent / "plugin_example"
README = pathlib.Path(__file__).parent.parent / "README.md"


@pytest.fixture
def token() -> Iterator[str]:
    """A name prefix for one example run; every segment carrying it is destroyed afterwards."""
    prefix = f"plug{secrets.token_hex(4)}"
    try:
        yield prefix
    finally:
        for name in shmdisk.list_disks():
            if name.startswith(prefix):
                shmdisk.destroy(name, force=True)  # a kept golden disk, its kept overlay


def left_behind(prefix: str) -> list[str]:
    """Segments on the machine whose names start with ``prefix``."""
    return [n for n in shmdisk.list_disks() if n.startswith(prefix)]


def shm_entries(token: str) -> set[str]:
    """Entries of /dev/shm (segments or anything else) whose names carry ``token``."""
    return {e for e in os.listdir("/dev/shm") if token in e}


def run_pytest(
    tmp_path: pathlib.Path,
    files: dict[str, str],
    *args: str,
    env: dict[str, str] | None = None,
    plugin_option: bool = True,
) -> tuple[dict[str, int], str]:
    """Write ``files`` into ``tmp_path`` and run pytest there; return outcome counts and output."""
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    # Pin the rootdir here so the project's own pytest configuration and conftest stay out.
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\n")
    child_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("PYTEST_XDIST", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "SHMDISK_TESTING")
        )
    }
    # Only the plugins the runs need: every other installed plugin would cost start-up time
    # in each xdist worker.
    child_env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--timeout=60"]
        + ["-p", "xdist.plugin", "-p", "pytest_timeout"]
        + (["-p", "shmdisk.testing"] if plugin_option else [])
        + list(args),
        cwd=tmp_path,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    summary = [
        line
        for line in output.splitlines()
        if re.search(r"\d+ (passed|failed|errors?)\b.* in [\d.]+s", line)
    ]
    counts = {
        kind.rstrip("s") if kind == "errors" else kind: int(n)
        for n, kind in re.findall(r"(\d+) (passed|failed|errors?)", summary[-1] if summary else "")
    }
    return counts, output


def example(name: str) -> str:
    """The text of one example file."""
    return (EXAMPLES / f"example_{name}.py").read_text()


def run_golden(
    tmp_path: pathlib.Path, token: str, *args: str, stray: str = "", **env: str
) -> tuple[dict[str, int], str, list[list[str]], dict[str, set[str]]]:
    """Run the golden-disk example suite; return outcome counts, output, the build log (one
    ``[event, pid, worker]`` per line) and the disk names the tests saw, by kind. Only the
    disk ``stray`` may be left behind."""
    names_dir = tmp_path / "names"
    names_dir.mkdir()
    builds = tmp_path / "builds"
    builds.touch()
    before = shm_entries(token)
    files = {
        "conftest.py": (EXAMPLES / "golden_conftest.py").read_text(),
        "test_golden.py": example("golden"),
    }
    env = {"EXAMPLE_BUILDS": str(builds), "EXAMPLE_NAMES_DIR": str(names_dir), **env}
    counts, output = run_pytest(tmp_path, files, "--shmdisk-prefix", token, *args, env=env)
    # Nothing of the run is left in /dev/shm: no segment, nor anything else carrying its names.
    assert shm_entries(token) - {f"shmdisk.{stray}"} == before == set(), output
    names: dict[str, set[str]] = {"golden": set(), "overlay": set()}
    for entry in names_dir.iterdir():
        kind, name = entry.name.split("=")
        names[kind].add(name)
    return counts, output, [line.split() for line in builds.read_text().splitlines()], names


def workers_of(names: set[str]) -> set[str]:
    """The xdist worker ids in fixture disk names."""
    return {m.group(1) for n in names if (m := re.search(r"-\d+-(gw\d+)-[0-9a-f]{12}$", n))}


@pytest.mark.parametrize("xdist", [[], ["-n", "2"], ["-n", "4"]], ids=["serial", "n2", "n4"])
def test_golden_disk_built_once_and_every_test_writes_its_own_overlay(
    tmp_path: pathlib.Path, token: str, xdist: list[str]
) -> None:
    """One build per run, one golden disk on every worker, a fresh private overlay per test."""
    counts, output, builds, names = run_golden(tmp_path, token, *xdist)
    assert counts == {"passed": 15}, output
    assert [event for event, _, _ in builds] == ["start", "done"], builds
    # Every test saw the same golden disk, named after the run and nothing else.
    (golden,) = names["golden"]
    run = golden.rsplit("-", 1)[1]
    assert re.fullmatch(rf"{token}-golden-build_image-[0-9a-f]{{8}}", golden), golden
    # The twelve tests that wrote had twelve overlays of that run (see example_golden.py for
    # the byte-for-byte checks each made).
    assert len(names["overlay"]) == 12
    assert all(n.startswith(f"{token}-test_overlay") and f"-{run}-" in n for n in names["overlay"])
    if xdist:
        # Several workers shared the golden disk that one of them built.
        assert len(workers_of(names["overlay"])) >= 2, names
        assert builds[0][2].startswith("gw")


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "n2"])
def test_golden_run_with_a_failing_test_leaves_nothing(
    tmp_path: pathlib.Path, token: str, xdist: list[str]
) -> None:
    """A test failing after writing to its overlay: the overlay and the golden disk still go."""
    counts, output, builds, names = run_golden(tmp_path, token, *xdist, EXAMPLE_FAIL="1")
    assert counts == {"passed": 15, "failed": 1}, output
    assert "failing on purpose" in output
    assert [event for event, _, _ in builds] == ["start", "done"], builds
    assert len(names["overlay"]) == 13


def test_golden_run_with_crashing_workers_leaves_nothing(
    tmp_path: pathlib.Path, token: str
) -> None:
    """A worker dying mid-build and one dying mid-test: rebuilt once, and nothing is left."""
    counts, output, builds, names = run_golden(
        tmp_path, token, "-n", "2", EXAMPLE_CRASH_FIRST_BUILD="1", EXAMPLE_CRASH_TEST="1"
    )
    # The test whose setup was building and the test that kills its worker are reported failed.
    assert counts == {"passed": 14, "failed": 2}, output
    # Each crash is named in the failure section and, as wide as the terminal allows, in the
    # short summary: count the distinct (worker, test) pairs, not the lines.
    crashes = set(re.findall(r"worker '(gw\d+)' crashed while running '([^']+)'", output))
    assert len(crashes) == 2, output
    assert "test_golden.py::test_kills_its_worker" in {test for _, test in crashes}, output
    # The first build died halfway; the next one (another process) started over and finished.
    assert [event for event, _, _ in builds] == ["start", "start", "done"], builds
    assert builds[0][1] != builds[1][1] == builds[2][1]
    # The overlay of the killed test was never torn down; the end of the run destroyed it.
    assert any("-test_kills_its_worker-" in n for n in names["overlay"]), names


def test_a_kept_overlay_keeps_its_golden_disk(tmp_path: pathlib.Path, token: str) -> None:
    """--shmdisk-keep-on-failure keeps a failing test's overlay and the golden disk it reads
    from (listed too), so that the overlay can be looked at after the run."""
    names_dir = tmp_path / "names"
    names_dir.mkdir()
    builds = tmp_path / "builds"
    files = {
        "conftest.py": (EXAMPLES / "golden_conftest.py").read_text(),
        "test_golden.py": example("golden"),
    }
    env = {"EXAMPLE_BUILDS": str(builds), "EXAMPLE_NAMES_DIR": str(names_dir), "EXAMPLE_FAIL": "1"}
    counts, output = run_pytest(
        tmp_path, files, "--shmdisk-prefix", token, "--shmdisk-keep-on-failure", "-n", "2", env=env
    )
    assert counts == {"passed": 15, "failed": 1}, output
    kept = kept_names(output)
    assert len(kept) == 2 and sorted(left_behind(token)) == sorted(kept), output
    overlay = next(n for n in kept if "-test_fails_after_writing-" in n)
    golden = next(n for n in kept if "-golden-" in n)
    assert f"{golden}  (a disk that kept overlays are made on)" in output
    with shmdisk.connect(overlay, create=False, read_only=True) as disk:
        assert disk.backing == golden
        image = read_all(disk)
    with shmdisk.connect(golden, create=False, read_only=True) as disk:
        assert image[512:] == read_all(disk)[512:] and image[:512].startswith(b"overlay of test")


def test_the_end_of_the_run_destroys_the_golden_disk_under_a_stray_overlay(
    tmp_path: pathlib.Path, token: str
) -> None:
    """An overlay of the golden disk that no fixture made does not keep the golden disk: the
    run destroys it all the same and names the overlay, which then says its base is lost."""
    stray = f"{token}-stray"
    counts, output, _, _ = run_golden(tmp_path, token, stray=stray, EXAMPLE_STRAY=stray)
    assert counts == {"passed": 16}, output
    assert f"{stray}: overlays of {token}-golden-build_image-" in output
    assert left_behind(token) == [stray]
    with pytest.raises(shmdisk.BackingLostError):
        shmdisk.connect(stray, create=False)


def kept_names(output: str) -> list[str]:
    """The disk names listed in the plugin's 'kept' summary section."""
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if "disks kept after failing" in line)
    except StopIteration:
        return []
    names = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith(("inspect", "=")):
            break
        names.append(line.split()[0])
    return names


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_fixtures_serve_worker_processes_and_leave_nothing(
    tmp_path: pathlib.Path, token: str, xdist: list[str]
) -> None:
    """The example suite passes (bar one planned failure) with or without xdist, leaving no disk."""
    names_dir = tmp_path / "names"
    names_dir.mkdir()
    counts, output = run_pytest(
        tmp_path,
        {"test_basic.py": example("basic")},
        "--shmdisk-prefix",
        token,
        *xdist,
        env={"EXAMPLE_NAMES_DIR": str(names_dir)},
    )
    assert counts == {"passed": 3, "failed": 1}, output
    assert left_behind(token) == []
    names = sorted(p.name for p in names_dir.iterdir())
    assert len(names) == 5 and all(n.startswith(f"{token}-test_") for n in names), names
    if xdist:
        # Each worker tags its names; the two workers are two processes with their own pids.
        tags = {re.search(r"-(\d+)-(gw\d)-", n).groups() for n in names}  # type: ignore[union-attr]
        assert {tag for _, tag in tags} == {"gw0", "gw1"}
        assert len({pid for pid, _ in tags}) == 2


def test_keep_marker_keeps_only_a_failing_marked_test_disk(
    tmp_path: pathlib.Path, token: str
) -> None:
    """@pytest.mark.shmdisk_keep keeps a failing test's disk, prints it, and keeps nothing else."""
    counts, output = run_pytest(
        tmp_path, {"test_keep.py": example("keep")}, "--shmdisk-prefix", token
    )
    assert counts == {"passed": 1, "failed": 3}, output
    assert "LeakedSegmentsError" not in output
    kept = kept_names(output)
    assert len(kept) == 2 and all("test_kept_" in name for name in kept), output
    assert "shmdisk-ls" in output
    assert sorted(left_behind(token)) == sorted(kept)
    evidence = next(name for name in kept if "test_kept_when_it_fails" in name)
    with shmdisk.connect(evidence, create=False, read_only=True) as disk:
        buf = bytearray(disk.sector_size)
        disk.read(0, buf)
        assert buf.startswith(b"evidence")


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_keep_option_keeps_every_failing_test_disk(
    tmp_path: pathlib.Path, token: str, xdist: list[str]
) -> None:
    """--shmdisk-keep-on-failure keeps the disks of all failing tests, also from xdist workers."""
    counts, output = run_pytest(
        tmp_path,
        {"test_keep.py": example("keep")},
        "--shmdisk-prefix",
        token,
        "--shmdisk-keep-on-failure",
        *xdist,
    )
    assert counts == {"passed": 1, "failed": 3}, output
    kept = kept_names(output)
    assert len(kept) == 3, output
    assert sorted(left_behind(token)) == sorted(kept)


def test_no_leaks_fixture_reports_a_leak_and_removes_it(tmp_path: pathlib.Path, token: str) -> None:
    """shmdisk_no_leaks turns a leaked segment into a teardown error and destroys it."""
    counts, output = run_pytest(
        tmp_path, {"test_leak.py": example("leak")}, env={"EXAMPLE_PREFIX": token}
    )
    assert counts == {"passed": 2, "error": 1}, output
    assert "LeakedSegmentsError" in output and f"{token}-leaky" in output
    assert left_behind(token) == []


def readme_examples() -> list[dict[str, str]]:
    """The README's plugin examples: each a conftest.py and the test files printed after it."""
    examples: list[dict[str, str]] = []
    blocks = re.findall(
        r"```python\n(# (conftest\.py|test_\w+\.py)\n.*?)```", README.read_text(), re.S
    )
    for text, filename in blocks:
        if filename == "conftest.py":
            examples.append({})
        examples[-1][filename] = text
    return examples


@pytest.mark.parametrize(
    ("index", "args", "passed"), [(0, [], 2), (1, ["-n", "4"], 8)], ids=["fixtures", "golden-n4"]
)
def test_readme_examples_run(
    tmp_path: pathlib.Path, token: str, index: int, args: list[str], passed: int
) -> None:
    """Each README plugin example passes as printed, the golden-disk one with the -n 4 shown."""
    examples = readme_examples()
    assert len(examples) == 2 and all(len(e) >= 2 for e in examples), "README examples not found"
    if args:
        assert f"pytest {' '.join(args)}" in README.read_text()
    before = shm_entries(token)
    # No -p here: the README's conftest.py enables the plugin itself.
    counts, output = run_pytest(
        tmp_path, examples[index], "--shmdisk-prefix", token, *args, plugin_option=False
    )
    assert counts == {"passed": passed}, output
    assert shm_entries(token) == before == set()


def test_unique_names_are_unique_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """unique_name carries the pid and xdist worker, cleans the prefix and is a valid disk name."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    names = {unique_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(re.fullmatch(rf"test-{os.getpid()}-[0-9a-f]{{12}}", n) for n in names)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert re.fullmatch(rf"job-{os.getpid()}-gw3-[0-9a-f]{{12}}", unique_name("job"))
    for prefix in ("tests/test_x.py::test_y[a b-1]", "é" * 300, ""):
        name = unique_name(prefix)
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and len(name) <= 100, name
        shmdisk.create(name, 1).disconnect()
        shmdisk.destroy(name)


def test_assert_no_leaks_raises_and_cleans_up() -> None:
    """assert_no_leaks names each leaked segment, destroys it, and is quiet when all is tidy."""
    with assert_no_leaks():
        tidy = unique_name("tidy")
        shmdisk.create(tidy, 1).disconnect()
        shmdisk.destroy(tidy)
    leaky = unique_name("leaky")
    with pytest.raises(LeakedSegmentsError) as info, assert_no_leaks():
        shmdisk.create(leaky, 1).disconnect()
    assert info.value.names == [leaky] and leaky in str(info.value)
    assert isinstance(info.value, AssertionError)
    assert leaky not in shmdisk.list_disks()


def test_assert_no_leaks_ignore_and_keep() -> None:
    """ignore() excuses a segment; cleanup=False reports it but leaves it in place."""
    name = unique_name("excused")
    try:
        with assert_no_leaks(ignore=lambda n: n == name):
            shmdisk.create(name, 1).disconnect()
        shmdisk.destroy(name)
        with pytest.raises(LeakedSegmentsError), assert_no_leaks(cleanup=False):
            shmdisk.create(name, 1).disconnect()
        assert name in shmdisk.list_disks()
    finally:
        shmdisk.destroy(name)


def test_helpers_import_without_pytest() -> None:
    """shmdisk.testing imports and its helpers work where pytest is not installed."""
    code = """
import sys

class NoPytest:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytest", "_pytest", "pluggy"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoPytest())
import shmdisk, shmdisk.testing as t
assert "pytest" not in sys.modules
assert not hasattr(t, "shmdisk_fixture")
name = t.unique_name("nopytest")
try:
    with t.assert_no_leaks():
        shmdisk.create(name, 1).disconnect()
except t.LeakedSegmentsError as e:
    assert e.names == [name]
else:
    raise SystemExit("leak not reported")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# Runs the command in argv in a new session and exits at once, printing its pid: the command's
# process is orphaned (re-parented away from us), so it is no descendant of the test.
_DETACH = """
import subprocess, sys
null = subprocess.DEVNULL
p = subprocess.Popen(sys.argv[1:], start_new_session=True, stdin=null, stdout=null, stderr=null)
print(p.pid)
"""


def start_unrelated(*cmd: str) -> int:
    """Start ``cmd`` as a process that is not a descendant of this one; return its pid."""
    # An unrelated process shares nothing with the test, not even the leak guard's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMDISK_TESTING")}
    proc = subprocess.run(
        [sys.executable, "-c", _DETACH, *cmd],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(proc.stdout)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("creator", ["exited", "running"])
def test_leak_guard_leaves_an_unrelated_process_disk_alone(creator: str) -> None:
    """A disk that an unrelated process makes during the block is neither reported nor destroyed."""
    name = unique_name("unrelated")
    if creator == "exited":  # the real CLI: creates the disk and exits
        cmd = ["-m", "shmdisk", "create", "-q", name, "8"]
    else:  # creates the disk and stays alive until killed
        cmd = ["-c", f"import shmdisk, time; shmdisk.create({name!r}, 8); time.sleep(600)"]
    pid = 0
    try:
        with assert_no_leaks():
            pid = start_unrelated(sys.executable, *cmd)
            wait_until(lambda: name in shmdisk.list_disks(), "the unrelated disk exists")
            if creator == "exited":
                wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "its creator is gone")
        assert name in shmdisk.list_disks()
        assert shmdisk.inspect(name).creator_pid == pid
    finally:
        if creator == "running" and pid:
            os.kill(pid, signal.SIGKILL)
        shmdisk.destroy(name)


def test_leak_guard_catches_a_child_that_leaked_and_exited() -> None:
    """A disk a child process named with unique_name and left behind is reported and destroyed."""
    code = "import shmdisk, shmdisk.testing as t; n = t.unique_name('child'); "
    code += "shmdisk.create(n, 8).disconnect(); print(n)"
    name = ""
    try:
        with pytest.raises(LeakedSegmentsError) as info, assert_no_leaks():
            child = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
            )
            name = child.stdout.strip()
            assert child.returncode == 0 and name, child.stderr
        assert info.value.names == [name]
        assert name not in shmdisk.list_disks()
    finally:
        if name:
            shmdisk.destroy(name)


def test_leak_guard_catches_a_running_child_whatever_the_name() -> None:
    """A disk a still-running child made under a name of its own is reported and destroyed."""
    name = f"child-{secrets.token_hex(6)}"
    code = f"import shmdisk, sys; shmdisk.create({name!r}, 8); print('made', flush=True); "
    code += "sys.stdin.read()"
    child: subprocess.Popen[str] | None = None
    try:
        with pytest.raises(LeakedSegmentsError) as info, assert_no_leaks():
            child = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None and child.stdout.readline() == "made\n"
        assert info.value.names == [name]
        assert name not in shmdisk.list_disks()
    finally:
        if child is not None:
            child.communicate(timeout=60)  # closes its stdin: it exits
        shmdisk.destroy(name)


def test_overlay_reads_as_its_base_and_keeps_its_own_writes() -> None:
    """An overlay holds the base's bytes and holes at no cost, takes writes the base never sees,
    reads zeros past a smaller base, and needs its sector size."""
    base_name, names = unique_name("base"), [unique_name("ovl"), unique_name("big")]
    sector = 512
    try:
        with shmdisk.create(base_name, 8192, sector) as base:  # 4 MiB
            # Two data runs, one longer than a copy chunk, around and between holes.
            base.write(8, os.urandom(3 * 1024 * 1024))
            base.write(7000, os.urandom(20 * sector))
            _freeze(base)
            image = read_all(base)
            with _overlay(names[0], base_name, None, None) as ovl:
                assert (ovl.get_info().size_sectors, ovl.sector_size) == (8192, sector)
                assert ovl.backing == base_name and ovl.mapped_pages() == 0
                assert read_all(ovl) == image
                assert ovl.extents() == base.extents()
                ovl.write(9, b"\xee" * sector)
                assert read_all(base) == image
                assert (
                    read_all(ovl) == image[: 9 * sector] + b"\xee" * sector + image[10 * sector :]
                )
            with _overlay(names[1], base_name, 10000, None) as big:
                assert read_all(big) == image + bytes(1808 * sector)
            with pytest.raises(shmdisk.ShmdiskError):
                _overlay(unique_name("bad"), base_name, None, 4096)
    finally:
        for name in [*names, base_name]:  # overlays before their base
            shmdisk.destroy(name)


def read_all(disk: shmdisk.Disk) -> bytes:
    """Every byte of ``disk``."""
    buf = bytearray(disk.get_info().size_sectors * disk.sector_size)
    disk.read(0, buf)
    return bytes(buf)


def test_golden_disk_without_the_plugin_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    """golden_disk refuses to build where no process of the run would destroy the disk."""
    conftest = """
from shmdisk.testing import golden_disk

def build(disk):
    raise AssertionError("must not be built")

golden = golden_disk(build, 8)
"""
    test = "def test_uses_it(golden):\n    pass\n"
    before = set(shmdisk.list_disks())
    counts, output = run_pytest(
        tmp_path, {"conftest.py": conftest, "test_it.py": test}, plugin_option=False
    )
    assert counts == {"error": 1}, output
    assert "golden_disk needs the shmdisk.testing plugin" in output
    assert not any("-golden-build-" in n for n in set(shmdisk.list_disks()) - before)
