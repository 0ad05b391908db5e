"""Long, configurable reliability runs against real shmdisk disks, printing figures.

Usage::

    python3 tools/stress torture --duration 60 --processes 4 --engines mixed
    python3 tools/stress torture --blocks --resize --duration 30   # discards and shrinks
    python3 tools/stress kill --duration 60 --engines mixed
    python3 tools/stress stopped --duration 30 --engines mixed
    python3 tools/stress nt-writes --duration 30 --engines mixed
    python3 tools/stress read-only --duration 30 --engines mixed
    python3 tools/stress resize-destroy --duration 60
    python3 tools/stress enospc --duration 30          # root: needs unshare -m
    python3 tools/stress hostile --examples 5000
    python3 tools/stress permissions                   # root: drops to uid 65534
    python3 tools/stress all --duration 10 --json

Sample output (``torture -d 3 --seed 1``, 2 cores; figures abridged)::

    torture          1.0s  ops 17296  16873/s  torn 0  corrupt 0
    torture          2.0s  ops 45120  22034/s  torn 0  corrupt 0
    torture          3.0s  ops 74528  24375/s  torn 0  corrupt 0
    torture: PASS  (3.5 s)
        processes                                    4
        ops                                          85472
        reads                                        42814
        writes                                       42654
        torn_reads                                   0
        corrupt_reads                                0
        ops_per_s                                    27279

Scenarios (see RELIABILITY.md for what each one proves and the figures of a real run):

- torture: N processes do random reads and writes (1 sector to several pages, overlapping,
  crossing page boundaries); every sector is stamped (tools/stamp.py), every read is checked.
- kill: victims are SIGKILLed at random moments, mid large write (up to 128 stripes), mid
  resize, and holding N or all 1024 stripes while probes of both engines wait on them; recovery
  timed, repairs counted, completed writes stay whole, no stripe left stuck.
- stopped: a SIGSTOPped stripe holder; timeout= and wait=False refuse on time, Ctrl-C gets a
  waiter out at once, SIGCONT lets everyone go on.
- nt-writes: 2-8 MiB writes on glibc's non-temporal copy path against lock-free readers.
- read-only: read-only handles beside writers killed mid-write: never stall, read what a dead
  writer left, never hold up the owner (also while SIGSTOPped).
- resize-destroy: one process resizes, one destroys and re-creates, others do I/O; no process
  may die of a signal; operations on destroyed handles raise DisconnectedError.
- enospc: in a private mount namespace with a small tmpfs over /dev/shm, write until
  DiskFullError; nothing partly written, old data intact, discard gives the space back.
- hostile: hypothesis-driven calls with bad arguments against a model, and forged segments
  (bad headers) connected in a child process, so a SIGBUS shows as a failure.
- permissions: another uid gets what each mode grants (0600 to 0666), never the right to
  destroy, and never stalls the owner by reading; another user's disk is used only with
  ``owner=``.

``--engines`` (inherit, native, python, mixed) picks the page-I/O engine of the child
processes; ``mixed`` alternates them on one disk and reports figures per engine.

Run it from a checkout as ``python3 tools/stress ...`` (the directory runs as a program), or as
``python3 -m stress ...`` with ``tools/`` on the path (pytest puts it there, see pyproject.toml).
One module per scenario (torture, kill with _kill_roles, stopped, nt_writes, read_only,
resize_destroy, enospc, hostile with forged, permissions); shared by them: ``_common`` (options,
results, processes), ``_requests`` (random requests), ``_engines`` (which engine a child runs),
``_nursery`` (fast forks of either engine), ``_probe`` (a caller observed inside a blocked call),
``_table`` (reading the lock table); ``cli`` the command line; this package re-exports what the
tests call.

Exit status: 0 every scenario passed, 1 a scenario failed, 2 bad usage.
``--json`` prints one object: ``{"version": 1, "results": [{"scenario", "ok", "figures",
"problems", "seconds"}, ...]}``.
"""

from ._common import Options, Result, unique_name
from .cli import JSON_VERSION, RUNNERS, SCENARIOS, main
from .enospc import enospc_child, run_enospc
from .forged import hostile_segments
from .hostile import hostile_api, run_hostile
from .kill import run_kill
from .nt_writes import run_nt_writes
from .permissions import run_permissions
from .read_only import run_read_only
from .resize_destroy import run_resize_destroy
from .stopped import run_stopped
from .torture import run_torture

__all__ = [
    "JSON_VERSION",
    "RUNNERS",
    "SCENARIOS",
    "Options",
    "Result",
    "enospc_child",
    "hostile_api",
    "hostile_segments",
    "main",
    "run_enospc",
    "run_hostile",
    "run_kill",
    "run_nt_writes",
    "run_permissions",
    "run_read_only",
    "run_resize_destroy",
    "run_stopped",
    "run_torture",
    "unique_name",
]
