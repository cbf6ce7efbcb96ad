"""`blockstore` command line, in the ldb tradition: one subcommand per job, each with --help and --json.

`get`, `scan`, `stats`, `dump` and `fsck` open the store read-only, so they are safe beside a live writer
(they see the directory as of the moment they opened); `compact` and `fsck --repair` take the writer lock.
Each subcommand lives in its own module with a `register(sub)` that adds its parser; adding one is one line
in BUILTIN. `compact` is compaction's: blockstore.compaction.cli registers it through the
"blockstore.commands" entry point (see _add_registered_commands), so the tools never import compaction.

Exit codes: 0 ok, 8 operational error (not a store, a key or block that is not there, I/O, a locked store),
16 usage error (any bad flag or flag value, printed with that subcommand's usage); fsck adds its bitmask.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from blockstore import __version__, logs
from blockstore.errors import BlockstoreError
from blockstore.tools import cli_fsck, cli_inspect, cli_read, metrics_cmd, top
from blockstore.tools.cli_common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError

__all__ = ["BUILTIN", "COMMANDS", "EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

COMMANDS = "blockstore.commands"  # the entry-point group of commands other packages add

# The subcommands of this package, in --help order: each adds its parser and sets `func` (args -> exit code).
BUILTIN: tuple[Callable[[Any], None], ...] = (
    cli_read.register_get,
    cli_read.register_scan,
    cli_inspect.register_stats,
    cli_inspect.register_dump,
    cli_fsck.register,
    metrics_cmd.register,
    top.register,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockstore",
        description="Inspect and maintain blockstore stores (log-structured block stores of KV and chunk "
        "records). get, scan, stats, dump and fsck open the store read-only and are safe beside a running "
        "writer; compact and fsck --repair need the store to itself. `blockstore COMMAND --help` explains "
        "each. Exit codes: 0 ok, 8 operational error, 16 usage error (fsck adds 1 corrected and 4 left "
        "uncorrected).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", dest="log_verbose", action="count", default=0,
                   help="log what the store does to stderr: -v INFO (opens, recovery, seals, compaction passes, "
                   "fsck findings, repair actions), -vv DEBUG; warnings are shown unless -q")
    p.add_argument("-q", "--quiet", dest="log_quiet", action="count", default=0,
                   help="log errors only (no warnings)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in BUILTIN:
        register(sub)
    _add_registered_commands(sub)
    for sp in sub.choices.values():  # a command's own usage errors print its usage (main, UsageError)
        sp.set_defaults(parser=sp)
    return p


def _add_registered_commands(sub: Any) -> None:
    """Commands other packages register as entry points of the group COMMANDS (pyproject.toml's
    [project.entry-points."blockstore.commands"]): each names a function that adds its subparser to
    `sub`. Compaction's `compact` comes this way, so neither the engine nor its tools import compaction.
    A command that fails to load is left out with a warning: stats, dump and fsck must keep working."""
    for ep in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plugin must not take fsck down with it
            print(f"blockstore: command {ep.name!r} ({ep.value}) is unavailable: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said with the subcommand's usage, not the top level's (argparse's default)
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse has printed the usage of the (sub)command it was parsing
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    logs.configure(args.log_verbose - args.log_quiet)
    try:
        return int(args.func(args))
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BlockstoreError as exc:
        print(f"blockstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (stores are closed on the way out by their `with`)
        # the advice only where work on the store was cut short (compact, fsck --repair); a read changed nothing
        writes = args.command == "compact" or bool(getattr(args, "repair", False))
        advice = "; run it again to finish (`blockstore fsck PATH` says what is left)" if writes else ""
        print(f"blockstore {args.command}: interrupted{advice}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:  # an exit status of 1 (Python's for a traceback) would read as fsck's "corrected"
        print(f"blockstore {args.command}: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `blockstore scan S | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_OK
    except OSError as exc:  # fsck reads and moves files itself: an OS error is an operational error too
        print(f"blockstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
