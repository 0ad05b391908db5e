"""Test helpers and an opt-in pytest plugin for code that uses shmdisk.

Enable the plugin in a ``conftest.py`` with ``pytest_plugins = ["shmdisk.testing"]`` or on the
command line with ``-p shmdisk.testing``. It provides:

- fixture ``shmdisk``: a fresh disk (default geometry) with a unique name, destroyed after the
  test even when the test fails;
- fixture ``shmdisk_factory``: ``factory(size_sectors, sector_size=512, **kw) -> Disk`` for any
  number of disks (``kw`` goes to ``shmdisk.create``; ``name=`` picks the name;
  ``backing=DISK`` makes an overlay of a golden disk), all destroyed after the test;
- ``golden_disk(build, size_sectors, ...)``: makes a session fixture, a disk that ``build``
  fills once per test run, then frozen and shared by every pytest-xdist worker of the run and
  destroyed when the run ends; ``overlay_disk("fixture name")`` makes a per-test fixture, a
  writable copy-on-write overlay of it, made in O(1) whatever the golden disk's size;
- fixture ``shmdisk_no_leaks``: fails the test (as a teardown error) if it leaves behind a
  shmdisk segment that it or a process it started made (``assert_no_leaks`` says how that is
  told); make it autouse in a ``conftest.py`` to guard a whole suite;
- marker ``@pytest.mark.shmdisk_keep`` and option ``--shmdisk-keep-on-failure``: when the test
  fails, its fixture disks are kept (disconnected, not destroyed) and their names are printed at
  the end of the run, for ``shmdisk-ls`` and a look at the bytes;
- option ``--shmdisk-prefix``: the prefix of fixture disk names (default ``pytest``).

Names are unique across processes, pytest-xdist workers and runs: they carry the prefix, the
test's name, the run's id, the pid, the xdist worker id and a random token. When the run ends,
the process that ends it (the xdist controller, or the only process) destroys every fixture
disk of the run still there, overlays before the disks they are made on, so a worker that
crashed leaves nothing behind (a golden disk that a kept overlay is made on is kept too). A
disk from a fixture can be handed to ``multiprocessing`` workers as is: a ``Disk`` pickles by
name and reconnects in the child.

The helpers ``unique_name`` and ``assert_no_leaks`` do not need pytest, which is only a test
dependency of shmdisk.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import filelock

import shmdisk as _shmdisk

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import pytest
else:
    try:
        import pytest
    except ModuleNotFoundError:  # the helpers below work without pytest
        pytest = None

__all__ = [
    "DiskFactory",
    "LeakedSegmentsError",
    "assert_no_leaks",
    "golden_disk",
    "overlay_disk",
    "unique_name",
]

# Leave room under the core's name limit for the pid, worker id and token.
_MAX_PREFIX = 48
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _xdist_worker() -> str:
    # pytest-xdist sets this in each worker process ("gw0", "gw1", ...).
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def _clean(prefix: str) -> str:
    return _UNSAFE.sub("_", prefix)[:_MAX_PREFIX] or "test"


def unique_name(prefix: str = "test") -> str:
    """Return a disk name no other process or xdist worker will pick.

    ``prefix-<pid>[-<xdist worker>]-<random>``; characters a name may not contain are replaced
    by ``_`` and a long prefix is cut, so any string (a test id, say) can serve as the prefix.
    """
    return _unique(_clean(prefix))


def _unique(stem: str) -> str:
    worker = _xdist_worker()
    middle = f"{os.getpid()}-{worker}" if worker else str(os.getpid())
    # 48 random bits: a pid reused by a later run on the same machine still gets a fresh name.
    name = f"{stem}-{middle}-{secrets.token_hex(6)}"
    _journal(name)
    return name


class LeakedSegmentsError(AssertionError):
    """Raised by ``assert_no_leaks`` when shmdisk segments were left behind."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names

    def __str__(self) -> str:
        return f"{len(self.names)} shmdisk segment(s) leaked: {', '.join(self.names)}"


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; the parent pid follows the state field.
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        parent = _parent_pid(pid)
        if parent is None or parent <= 1:
            return False
        pid = parent
    return False


# The leak guard's journals: in-memory files to which unique_name appends every name it makes
# while a guard is open. This variable names them, "<pid>/<fd>/<dev>/<inode>" each (several
# when guards nest), and children inherit it: the names a child makes count as the guarded
# code's even after the child exited. A journal lives exactly as long as its guard's process:
# nothing is left to clean up when that process dies.
_JOURNALS_ENV = "SHMDISK_TESTING_JOURNALS"


def _journal(name: str) -> None:
    for entry in os.environ.get(_JOURNALS_ENV, "").split():
        try:
            pid, fd, dev, ino = (int(field) for field in entry.split("/"))
            out = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except (OSError, ValueError):
            continue  # the guard is gone
        try:
            # The guard's pid and descriptor number may have been reused since: write only
            # into the journal itself.
            st = os.fstat(out)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.write(out, f"{name}\n".encode())
        finally:
            os.close(out)


@contextlib.contextmanager
def _journaling() -> Iterator[Callable[[], set[str]]]:
    """Journal the names unique_name makes in the block, here and in children started in it."""
    fd = os.memfd_create("shmdisk-guard-names", os.MFD_CLOEXEC)
    st = os.fstat(fd)
    outer = os.environ.get(_JOURNALS_ENV)
    entry = f"{os.getpid()}/{fd}/{st.st_dev}/{st.st_ino}"
    os.environ[_JOURNALS_ENV] = entry if outer is None else f"{entry} {outer}"

    def names() -> set[str]:
        return set(os.pread(fd, os.fstat(fd).st_size, 0).decode().split())

    try:
        yield names
    finally:
        if outer is None:
            os.environ.pop(_JOURNALS_ENV, None)
        else:
            os.environ[_JOURNALS_ENV] = outer
        os.close(fd)


def _made_by_guarded_code(name: str, journaled: set[str]) -> bool:
    """True for a segment the guarded code made: named by it, or made by it or a child."""
    if name in journaled:
        return True  # unique_name made this name here or in a child: nobody else can have it
    try:
        creator = _shmdisk.inspect(name).creator_pid
    except _shmdisk.ShmdiskError:
        return False  # vanished or unreadable meanwhile: nothing of ours to clean up
    # A header that names no creator (corrupt or half-made) cannot be attributed. Nor can a
    # creator that has exited: an unrelated `shmdisk create` looks just like a child of ours
    # once it is gone, so only a live creator counts: this process or one it started.
    return creator is not None and _descends_from(creator, os.getpid())


@contextlib.contextmanager
def assert_no_leaks(
    *, ignore: Callable[[str], bool] | None = None, cleanup: bool = True
) -> Iterator[None]:
    """Fail with ``LeakedSegmentsError`` if the block leaves new shmdisk segments behind.

    Compares ``shmdisk.list_disks()`` before and after and counts only what the block made: a
    new segment whose name ``unique_name`` made during the block (in this process or in a
    process it started, even one that has exited since), or whose creator is still running and
    is this process or one it started. Segments made meanwhile by anyone else (another test
    run, another xdist worker, a ``shmdisk create`` in a shell) are left alone; so are those
    ``ignore(name)`` accepts, and those whose header names no creator. A child that exits
    after making a disk under a name it chose itself cannot be told from an unrelated process,
    so its disk is not counted: name such disks with ``unique_name``. With ``cleanup`` (the
    default) leaked segments are destroyed after being reported, so one leak does not spill
    into the next test. Nothing is checked when the block itself raises.
    """
    before = set(_shmdisk.list_disks())
    with _journaling() as journaled:
        yield
        made = journaled()
        leaked = sorted(
            name
            for name in set(_shmdisk.list_disks()) - before
            if not (ignore is not None and ignore(name)) and _made_by_guarded_code(name, made)
        )
    if leaked:
        if cleanup:
            for name in leaked:
                _shmdisk.destroy(name)
        raise LeakedSegmentsError(leaked)


class DiskFactory(Protocol):
    """The type of the ``shmdisk_factory`` fixture."""

    def __call__(
        self,
        size_sectors: int = ...,
        sector_size: int = ...,
        *,
        name: str | None = None,
        backing: _shmdisk.Disk | str | None = None,
        **kwargs: Any,
    ) -> _shmdisk.Disk: ...


# -- overlays of a golden disk --------------------------------------------------------------


def _freeze(disk: _shmdisk.Disk) -> None:
    """Make a freshly built golden disk read-only for good, in every process, so that it can
    back overlays and no test can change it, even one that connects to it by name."""
    disk.freeze()


def _overlay(
    name: str,
    base: str,
    size_sectors: int | None,
    sector_size: int | None,
    **kwargs: Any,
) -> _shmdisk.Disk:
    """A copy-on-write overlay of the golden disk ``base``, made in O(1): it reads as the base
    until written and costs only what is written to it. Geometry: the base's by default."""
    return _shmdisk.create(name, size_sectors, sector_size, backing=base, **kwargs)


def _build_golden(
    name: str, build: Callable[[_shmdisk.Disk], object], size_sectors: int, sector_size: int
) -> None:
    # A worker that crashed while building left a half-built disk of this run's name behind.
    _shmdisk.destroy(name)
    disk = _shmdisk.create(name, size_sectors, sector_size)
    try:
        build(disk)
        _freeze(disk)
    except BaseException:
        disk.disconnect()
        _shmdisk.destroy(name)
        raise
    disk.disconnect()


# -- the pytest plugin: everything below needs pytest ---------------------------------------

_KEEP_OPTION = "--shmdisk-keep-on-failure"
_PREFIX_OPTION = "--shmdisk-prefix"
# A kept disk is recorded as a user property of the test: properties travel with the test
# report from an xdist worker to the controller, which prints the summary.
_KEPT_PROPERTY = "shmdisk_kept"
# Fixture disks carry this many hex digits of the run id: the run's last clean-up destroys
# what carries them, whichever worker made it and whether or not that worker lived on.
_RUN_TAG = 8
# The plugin object that ends the run is registered under this name; in an xdist run the
# controller also sets it in each worker's workerinput, so the workers know it is there.
_RUN_DISKS = "shmdisk-run-disks"


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _cleaned_up_at_run_end(config: pytest.Config) -> bool:
    """Whether the process that ends the run has the plugin, to destroy the run's disks."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return bool(workerinput.get(_RUN_DISKS))  # set by the controller's plugin
    return config.pluginmanager.has_plugin(_RUN_DISKS)


def _run_tag(config: pytest.Config) -> str:
    """The run's id: pytest-xdist's testrun_uid in an xdist run, shared by all its processes."""
    workerinput = getattr(config, "workerinput", None)
    run: str = workerinput["testrunuid"] if workerinput is not None else config.stash[_run_key]
    return run[:_RUN_TAG]


def _prefix(config: pytest.Config) -> str:
    return str(config.getoption(_PREFIX_OPTION))


def _fixture_disk_name(config: pytest.Config, test: str) -> str:
    """``<prefix>-<test>-<run id>-<pid>[-<xdist worker>]-<random>``."""
    return _unique(f"{_clean(f'{_prefix(config)}-{test}')}-{_run_tag(config)}")


def _golden_name(config: pytest.Config, label: str) -> str:
    """``<prefix>-golden-<label>-<run id>``: the same in every process of the run."""
    return f"{_clean(f'{_prefix(config)}-golden-{label}')}-{_run_tag(config)}"


def _of_this_run(config: pytest.Config, name: str) -> bool:
    tag = _run_tag(config)
    return name.startswith(_clean(f"{_prefix(config)}-")) and (
        f"-{tag}-" in name or name.endswith(f"-{tag}")
    )


def _is_golden(config: pytest.Config, name: str) -> bool:
    # Only golden names end with the run id; the others end with a random token.
    return _of_this_run(config, name) and name.endswith(f"-{_run_tag(config)}")


def _depth(name: str) -> int:
    """How many disks lie under ``name`` in its chain of overlays (0: no overlay, or gone)."""
    depth, seen = 0, {name}
    while True:
        try:
            backing = _shmdisk.inspect(name).backing
        except _shmdisk.ShmdiskError:
            return depth
        if backing is None or backing in seen:
            return depth
        seen.add(backing)
        name, depth = backing, depth + 1


def _bases_of(names: set[str]) -> set[str]:
    """Every disk that one of ``names`` reads from, down its chain of overlays."""
    out: set[str] = set()
    for name in names:
        while True:
            try:
                backing = _shmdisk.inspect(name).backing
            except _shmdisk.ShmdiskError:
                break
            if backing is None or backing in out:
                break
            out.add(backing)
            name = backing
    return out


def golden_disk(
    build: Callable[[_shmdisk.Disk], object],
    size_sectors: int = _shmdisk.DEFAULT_SIZE_SECTORS,
    sector_size: int = _shmdisk.DEFAULT_SECTOR_SIZE,
    *,
    label: str | None = None,
) -> Any:
    """Make a session fixture: a disk built once per test run and shared by all its processes.

    Assign the result in a ``conftest.py``; the name you assign it to names the fixture::

        golden = golden_disk(build_image, size_sectors=1 << 16)

    The first test of the run that needs the fixture, in whichever pytest-xdist worker, creates
    the disk, calls ``build(disk)`` on it and freezes it (``Disk.freeze``: read-only for good,
    so that overlays can be made on it); every worker then gets a read-only handle on the
    same disk. The disk is destroyed when the whole run ends: after the last worker is done,
    also when tests failed or a worker crashed (a worker that crashes while building leaves the
    build to the next one). Its name, the same on every worker, is
    ``<prefix>-golden-<label>-<run id>`` (``label`` defaults to the name of ``build``); give two
    golden disks of one run different labels. A build that raises errors the tests that need
    the disk (once per worker) and leaves no disk behind.
    """
    tag = label or getattr(build, "__name__", "") or "disk"

    def fixture(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[_shmdisk.Disk]:
        if not _cleaned_up_at_run_end(request.config):
            raise pytest.UsageError(
                "golden_disk needs the shmdisk.testing plugin in every pytest process: enable it"
                " with `-p shmdisk.testing` or in the top conftest.py"
            )
        name = _golden_name(request.config, tag)
        # pytest-xdist's recipe for work done once per session: a file lock in the temporary
        # directory the run's workers share. In a run without xdist that is the run's own
        # directory (its parent is shared by every run of the user).
        shared = tmp_path_factory.getbasetemp()
        if _is_worker(request.config):
            shared = shared.parent
        built = shared / f"shmdisk-{name}.built"
        # flock: a worker that dies holding it releases it.
        with filelock.FileLock(shared / f"shmdisk-{name}.lock"):
            if not built.exists():
                _build_golden(name, build, size_sectors, sector_size)
                built.touch()
        with _shmdisk.connect(name, read_only=True, create=False) as disk:
            yield disk

    fixture.__doc__ = f"The golden disk {tag!r}: built once per run, read-only, shared by all."
    return pytest.fixture(fixture, scope="session")


def overlay_disk(golden: str) -> Any:
    """Make a per-test fixture: a fresh, writable overlay of the golden disk fixture ``golden``.

    Assign the result in a ``conftest.py``: ``image = overlay_disk("golden")``. Each test gets
    its own disk that reads as the golden disk until it writes, destroyed after the test (or
    kept, like the ``shmdisk`` fixture's disks, when the test fails and keeping was asked for).
    For several overlays in one test, call ``shmdisk_factory(backing=golden)``.
    """

    def fixture(request: pytest.FixtureRequest, shmdisk_factory: DiskFactory) -> _shmdisk.Disk:
        base: _shmdisk.Disk = request.getfixturevalue(golden)
        return shmdisk_factory(backing=base)

    fixture.__doc__ = f"A fresh writable overlay of {golden!r} for each test, destroyed after."
    return pytest.fixture(fixture)


if pytest is not None:
    _failed_key = pytest.StashKey[dict[str, bool]]()
    _run_key = pytest.StashKey[str]()

    def pytest_addoption(parser: pytest.Parser) -> None:
        group = parser.getgroup("shmdisk", "shmdisk disks for tests")
        group.addoption(
            _KEEP_OPTION,
            action="store_true",
            default=False,
            help="keep the fixture disks of failing tests (not destroyed) and print their names",
        )
        group.addoption(
            _PREFIX_OPTION,
            default="pytest",
            metavar="PREFIX",
            help="prefix of the names of fixture disks (default: pytest)",
        )

    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line(
            "markers",
            "shmdisk_keep: keep this test's shmdisk fixture disks when it fails, for inspection",
        )
        # The run id of a run without xdist; in an xdist run, see pytest_configure_node.
        config.stash[_run_key] = uuid.uuid4().hex
        config.pluginmanager.register(_RunDisks(config), _RUN_DISKS)

    class _RunDisks:
        """The end of the run: lists the kept disks, destroys the run's other disks.

        Only the process that ends the run does it: the xdist controller, after every worker
        has finished or crashed, or the single process of a run without xdist.
        """

        def __init__(self, config: pytest.Config) -> None:
            self.config = config
            self.kept: list[tuple[str, str]] = []
            self.undestroyed: list[tuple[str, str]] = []

        @pytest.hookimpl(optionalhook=True)
        def pytest_configure_node(self, node: Any) -> None:
            # pytest-xdist, in the controller, starting a worker: the workers name this run's
            # disks after xdist's testrun_uid, so the controller's clean-up must use it too.
            self.config.stash[_run_key] = node.workerinput["testrunuid"]
            node.workerinput[_RUN_DISKS] = True  # tells the worker that the run's end cleans up

        def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
            self.kept.extend(
                (str(value), report.nodeid)
                for key, value in report.user_properties
                if key == _KEPT_PROPERTY
            )

        @pytest.hookimpl(trylast=True)  # after pytest-xdist has shut its workers down
        def pytest_sessionfinish(self, session: pytest.Session) -> None:
            if _is_worker(self.config):
                return
            # Golden disks, and the disks of crashed workers (their fixtures never tore down).
            left = [n for n in _shmdisk.list_disks() if _of_this_run(self.config, n)]
            kept = {name for name, _ in self.kept}
            # A kept overlay is only worth keeping with the disks it reads from.
            for name in sorted(_bases_of(kept) & set(left) - kept):
                self.kept.append((name, "a disk that kept overlays are made on"))
                kept.add(name)
            # Overlays before the disks they sit on (destroy refuses a base with overlays):
            # the deepest first, golden disks last.
            order = sorted(left, key=lambda n: (_is_golden(self.config, n), -_depth(n)))
            for name in order:
                if name in kept:
                    continue
                try:
                    _shmdisk.destroy(name)
                except _shmdisk.DiskBusyError as exc:
                    # Overlays made outside the plugin's fixtures still use it: the run's disks
                    # must go all the same; they lose their base.
                    users = ", ".join(getattr(exc, "overlays", []))
                    _shmdisk.destroy(name, force=True)
                    self.undestroyed.append(
                        (users, f"overlays of {name}, which was destroyed at the end of the run")
                    )
                except _shmdisk.ShmdiskError as exc:
                    self.undestroyed.append((name, str(exc)))

        def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
            if self.kept:
                terminalreporter.section("shmdisk: disks kept after failing tests")
                for name, nodeid in self.kept:
                    terminalreporter.line(f"{name}  ({nodeid})")
                terminalreporter.line(
                    "inspect with `shmdisk-ls NAME...`; remove with `shmdisk destroy NAME...`"
                )
            if self.undestroyed:
                terminalreporter.section("shmdisk: disks of this run left behind, or left baseless")
                for name, why in self.undestroyed:
                    terminalreporter.line(f"{name}: {why}")

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(item: pytest.Item) -> Any:
        # Remember whether setup or call failed, for the fixtures' teardown to see.
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        item.stash.setdefault(_failed_key, {})[report.when] = report.failed

    def _keep_on_failure(request: pytest.FixtureRequest) -> bool:
        node = request.node
        failed = node.stash.get(_failed_key, {})
        if not (failed.get("setup") or failed.get("call")):
            return False
        return bool(request.config.getoption(_KEEP_OPTION)) or (
            node.get_closest_marker("shmdisk_keep") is not None
        )

    def _kept_names(request: pytest.FixtureRequest) -> set[str]:
        return {str(v) for k, v in request.node.user_properties if k == _KEPT_PROPERTY}

    def _release(request: pytest.FixtureRequest, disks: list[_shmdisk.Disk]) -> None:
        keep = _keep_on_failure(request)
        first_error: BaseException | None = None
        # The last made first: an overlay goes before the disk it is made on.
        for disk in reversed(disks):
            # Go on with the other disks when one fails: each must still be destroyed.
            try:
                disk.disconnect()
                if keep:
                    request.node.user_properties.append((_KEPT_PROPERTY, disk.name))
                else:
                    _shmdisk.destroy(disk.name)
            except Exception as exc:
                first_error = first_error or exc
                with contextlib.suppress(Exception):
                    _shmdisk.destroy(disk.name)
        if first_error is not None:
            raise first_error

    @pytest.fixture(name="shmdisk_factory")
    def shmdisk_factory_fixture(request: pytest.FixtureRequest) -> Iterator[DiskFactory]:
        """A callable ``(size_sectors, sector_size=512, **kw) -> Disk``; all destroyed after.

        With ``backing=`` (a golden disk or its name) the new disk is an overlay of it, and its
        size and sector size default to the golden disk's.
        """
        disks: list[_shmdisk.Disk] = []

        def factory(
            size_sectors: int | None = None,
            sector_size: int | None = None,
            *,
            name: str | None = None,
            backing: _shmdisk.Disk | str | None = None,
            **kwargs: Any,
        ) -> _shmdisk.Disk:
            if name is None:
                name = _fixture_disk_name(request.config, request.node.name)
            if backing is not None:
                base = backing if isinstance(backing, str) else backing.name
                disk = _overlay(name, base, size_sectors, sector_size, **kwargs)
            else:
                disk = _shmdisk.create(
                    name,
                    _shmdisk.DEFAULT_SIZE_SECTORS if size_sectors is None else size_sectors,
                    _shmdisk.DEFAULT_SECTOR_SIZE if sector_size is None else sector_size,
                    **kwargs,
                )
            disks.append(disk)
            return disk

        try:
            yield factory
        finally:
            _release(request, disks)

    @pytest.fixture(name="shmdisk")
    def shmdisk_fixture(shmdisk_factory: DiskFactory) -> _shmdisk.Disk:
        """A fresh disk of the default geometry with a unique name, destroyed after the test."""
        return shmdisk_factory()

    @pytest.fixture(name="shmdisk_no_leaks")
    def shmdisk_no_leaks_fixture(request: pytest.FixtureRequest) -> Iterator[None]:
        """Fail the test (in teardown) if it leaves a shmdisk segment behind."""

        # Disks kept for inspection after a failure are left behind on purpose; a golden disk
        # built during the test belongs to the whole run.
        def ignore(name: str) -> bool:
            return name in _kept_names(request) or _is_golden(request.config, name)

        with assert_no_leaks(ignore=ignore):
            yield
