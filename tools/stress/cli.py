"""The command line: pick scenarios, set their options, print figures or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from . import _engines
from ._common import (
    Options,
    Result,
)
from .enospc import run_enospc
from .hostile import run_hostile
from .kill import run_kill
from .nt_writes import run_nt_writes
from .permissions import run_permissions
from .read_only import run_read_only
from .resize_destroy import run_resize_destroy
from .stopped import run_stopped
from .torture import run_torture

#: Version of the --json document, as in shmdisk's own --json: bumped when a key changes meaning.
JSON_VERSION = 1
SCENARIOS = (
    "torture",
    "kill",
    "stopped",
    "nt-writes",
    "read-only",
    "resize-destroy",
    "enospc",
    "hostile",
    "permissions",
)

RUNNERS: dict[str, Callable[[Options], Result]] = {
    "torture": run_torture,
    "kill": run_kill,
    "stopped": run_stopped,
    "nt-writes": run_nt_writes,
    "read-only": run_read_only,
    "resize-destroy": run_resize_destroy,
    "enospc": run_enospc,
    "hostile": run_hostile,
    "permissions": run_permissions,
}


def _summary(r: Result) -> str:
    status = "SKIP" if r.skipped else ("PASS" if r.ok else "FAIL")
    lines = [f"{r.scenario}: {status}  ({r.seconds:.1f} s)"]
    if r.skipped:
        lines.append(f"    {r.skipped}")
    for k, v in r.figures.items():
        lines.append(f"    {k:<44} {v}")
    for p in r.problems:
        lines.append(f"    problem: {p}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="stress",
        description="Reliability stress runs for shmdisk: each scenario prints figures and "
        "exits 1 if the library broke a promise. See RELIABILITY.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n"
        "  torture         random overlapping reads/writes, every read checked for tearing\n"
        "  kill            SIGKILL victims mid-write, holding up to 128 or all 1024 stripes;\n"
        "                  survivors must recover (timed), no stripe may be left stuck\n"
        "  stopped         a SIGSTOPped stripe holder: timeouts, wait=False, Ctrl-C, SIGCONT\n"
        "  nt-writes       2-8 MiB writes on glibc's non-temporal path vs lock-free readers\n"
        "  read-only       read-only readers beside writers killed mid-write; never stall\n"
        "                  and never hold up the owner, even when SIGSTOPped\n"
        "  resize-destroy  resize and destroy/re-create under I/O; no signal deaths\n"
        "  enospc          fill a private small tmpfs over /dev/shm (root, unshare -m)\n"
        "  hostile         bad arguments vs a model; forged segment headers (child process)\n"
        "  permissions     uid 65534 vs root's 0600..0666 disks; owner trust (root)\n"
        "  all             every scenario in turn\n\n"
        "example: python3 tools/stress torture --duration 60 --processes 4 --engines mixed",
    )
    ap.add_argument("scenario", choices=[*SCENARIOS, "all"], help="what to run")
    ap.add_argument(
        "-d", "--duration", type=float, default=10.0, help="seconds per timed scenario (default 10)"
    )
    ap.add_argument(
        "-p",
        "--processes",
        type=int,
        default=4,
        help="processes (default 4). torture: workers; kill: half are writer victims, the "
        "rest read, plus one survivor writer, one resize victim, holders and two probes; "
        "nt-writes: half write, half read; read-only: N-1 (at least 2) read-only readers "
        "besides the owner, two victims and two probes; resize-destroy: N-2 (at least 2) do "
        "I/O besides the resizer and the destroyer",
    )
    ap.add_argument("--seed", type=int, help="random seed (default: a fresh one)")
    ap.add_argument(
        "--engines",
        choices=_engines.CHOICES,
        default="inherit",
        help="page-I/O engine of the child processes: inherit (this process's environment: "
        "native unless SHMDISK_NO_EXTENSIONS=1), native, python, or mixed (alternating, on "
        "one disk; per-engine figures). Default inherit",
    )
    ap.add_argument(
        "--min-kills",
        type=int,
        default=0,
        help="kill, read-only: go on past --duration until this many kills were done (at "
        "most 3x the duration), so a loaded machine still gets them all",
    )
    ap.add_argument(
        "--window-at",
        type=int,
        default=0,
        help="torture: first page of the I/O window of --disk-pages pages (default 0; "
        "1000 makes requests cross the 1024-page boundary of the page map's own pages)",
    )
    ap.add_argument(
        "--blocks",
        action="store_true",
        help="torture: write, discard and zero whole blocks (2 pages + 3 sectors, edges "
        "inside pages); every block must read as one whole request or all zeros",
    )
    ap.add_argument(
        "--resize",
        action="store_true",
        help="torture --blocks: now and then shrink the disk to a block boundary and grow it "
        "back; dropped blocks must read zero, never half-dropped",
    )
    ap.add_argument(
        "--no-discard",
        dest="discard",
        action="store_false",
        help="torture --blocks: no discards or zeroings (to look at --resize alone)",
    )
    ap.add_argument(
        "--churn",
        action="store_true",
        help="torture: each of --threads runs short-lived threads one after another on the "
        "shared handle (a thread that ends must leave no stripe held, nothing open)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torture: threads per process sharing one handle (default 1)",
    )
    ap.add_argument(
        "--sector-size",
        type=int,
        default=512,
        help="torture, kill: sector size of the test disk (default 512)",
    )
    ap.add_argument(
        "--disk-pages",
        type=int,
        default=64,
        help="torture: disk size in 4 KiB pages (default 64: many collisions)",
    )
    ap.add_argument(
        "--max-pages", type=int, default=4, help="torture: longest request in pages (default 4)"
    )
    ap.add_argument(
        "--large-mib",
        type=float,
        default=8.0,
        help="kill: a writer victim's largest write in MiB (default 8: 128 stripes of "
        "64 KiB); each write covers 1 stripe up to that",
    )
    ap.add_argument(
        "--examples",
        type=int,
        default=2000,
        help="hostile: hypothesis examples (default 2000; forged segments: 1/4)",
    )
    ap.add_argument(
        "--tmpfs-size", default="8M", help="enospc: size of the private tmpfs (default 8M)"
    )
    ap.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout (progress goes to stderr)",
    )
    ap.add_argument(
        "--split-writes",
        action="store_true",
        help="torture self-test: issue each request as several writes, which must be "
        "reported as torn reads (proves the checker can see tearing)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.processes < 2:
        ap.error("--duration must be > 0 and --processes at least 2")
    if args.min_kills < 0:
        ap.error("--min-kills must be >= 0")
    stream = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    opt = Options(
        duration=args.duration,
        processes=args.processes,
        seed=args.seed,
        progress=None if args.quiet else say,
        disk_pages=args.disk_pages,
        max_pages=args.max_pages,
        large_mib=args.large_mib,
        examples=args.examples,
        tmpfs_size=args.tmpfs_size,
        split_writes=args.split_writes,
        threads=args.threads,
        window_at=args.window_at,
        blocks=args.blocks,
        resize=args.resize,
        discard=args.discard,
        churn=args.churn,
        sector_size=args.sector_size,
        engines=args.engines,
        min_kills=args.min_kills,
    )
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    for n in names:
        t0 = time.monotonic()
        res = RUNNERS[n](opt)
        res.seconds = res.seconds or time.monotonic() - t0
        results.append(res)
        if not args.json:
            print(_summary(res), flush=True)
    if args.json:
        print(
            json.dumps(
                {"version": JSON_VERSION, "results": [x.as_dict() for x in results]}, indent=2
            )
        )
    return 0 if all(x.ok for x in results) else 1
