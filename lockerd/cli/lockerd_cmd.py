"""The `lockerd` command: run the daemon, run the simulator demo, check and inspect a bank."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hal.errors import HalError
from lockerd import __version__
from lockerd.config import Config, load_config
from lockerd.errors import LockerdError, StoreError, TrustError
from lockerd.logs import configure_logging

if TYPE_CHECKING:
    from lockerd.services.cache import CodeCache
    from lockerd.store import Database

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockerd",
        description="Controller daemon of a parcel-locker bank: drives the keypad, scanner, "
        "display and door locks, validates codes offline against a signed code cache and "
        "records every event durably.",
    )
    parser.add_argument("--version", action="version", version=f"lockerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon with a configuration file",
                         description="Run the daemon until SIGTERM, SIGINT or SIGHUP (a clean "
                         "stop each; the config is read at the start only, so a changed one "
                         "takes effect at the next start).")
    run.add_argument("-c", "--config", required=True, type=Path, help="TOML configuration file")

    demo = sub.add_parser(
        "demo", help="run the daemon on the simulator and drive it from this terminal",
        description="Start lockerd on the simulated bank with a freshly generated demo key set "
        "and codes bundle (no broker needed). In a terminal it opens the simulator's UI (the "
        "compartments, the display, a keypad, the events; '?' lists its keys). With --plain, "
        "or without a terminal, it prints a few pickup codes and reads commands "
        "from the terminal: type a code ending in # to enter it, 'open 3' / 'close 3' to move "
        "a door, 'take 3' to take a parcel out, 'tour' for a guided courier deposit and "
        "pickup, 'help' for the rest. A courier code is printed too.")
    demo.add_argument("--dir", type=Path, default=None,
                      help="keep the demo's keys, config and database here (default: a "
                      "temporary directory removed at exit)")
    demo.add_argument("--compartments", type=int, default=8, help="number of compartments (8)")
    demo.add_argument("--wire", action="store_true",
                      help="run the simulated hardware on pseudo-terminals (Kerong lock boards, "
                      "serial scanner and keypad) and the daemon with its real drivers")
    demo.add_argument("--tour", action="store_true",
                      help="run the guided tour (a courier deposits a parcel, its customer "
                      "picks it up with the derived pickup code) and exit; exit status 1 if a "
                      "step of it fails; in the UI, the tour plays step by step and the UI "
                      "stays open)")
    demo.add_argument("--plain", action="store_true",
                      help="the transcript demo (what runs when stdin or stdout is not a "
                      "terminal) instead of the terminal UI")
    demo.add_argument("--socket", type=Path, default=None,
                      help="with --db: open the UI on a daemon already running on the "
                      "simulator, by its [backends.sim] socket")
    demo.add_argument("--db", type=Path, default=None,
                      help="with --socket: that daemon's database (<state_dir>/lockerd.db), "
                      "read-only, for its events")

    check = sub.add_parser("check-config", help="validate a configuration file and exit",
                           description="Validate a configuration file with every check "
                           "'run' makes before it starts: syntax, types, keys, the code key "
                           "and password files, and every hal backend built with its options "
                           "(no port or GPIO line is opened, no database touched).")
    check.add_argument("-c", "--config", required=True, type=Path)

    for name, what in (("import-keyring", "keyring"), ("import-bundle", "codes bundle")):
        imp = sub.add_parser(
            name, help=f"verify a signed {what} file and store it in the bank's database",
            description=f"Verify a signed {what} file exactly as the daemon does and, if it is "
            "accepted, store it in the bank's database (works while the daemon runs: a snapshot "
            "is written beside the codes in use in short transactions and swapped in at once, "
            "so a commit of the daemon waits for one of those at most). A refused file changes "
            "nothing; the reason is printed and recorded as a cache.rejected event.")
        imp.add_argument("-c", "--config", required=True, type=Path)
        imp.add_argument("file", type=Path)

    ev = sub.add_parser("events", help="print the most recent events of the bank's database",
                        description="Print recent events as JSON lines, oldest first.")
    ev.add_argument("-c", "--config", required=True, type=Path)
    ev.add_argument("-n", type=int, default=20, help="how many (20)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    """The terminal UI when this is a terminal, the transcript otherwise (or with --plain)."""
    if (args.socket is None) != (args.db is None):
        print("lockerd demo: --socket and --db go together", file=sys.stderr)
        return 2
    if args.socket is not None:
        if args.wire or args.tour or args.plain or args.dir is not None:
            print("lockerd demo: --socket and --db open the UI on a daemon already running; "
                  "--wire, --tour, --plain and --dir are for the demo's own bank",
                  file=sys.stderr)
            return 2
        from lockerd.dev.ui.run import attach_ui

        return attach_ui(socket=args.socket, db=args.db)
    if not args.plain and sys.stdin.isatty() and sys.stdout.isatty():
        from lockerd.dev.ui.run import run_ui

        return run_ui(directory=args.dir, compartments=args.compartments, wire=args.wire,
                      tour=args.tour)
    from lockerd.dev.demo import run_demo

    return run_demo(directory=args.dir, compartments=args.compartments, wire=args.wire,
                    tour=args.tour)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        config = load_config(args.config)
        configure_logging(config.logging.level, config.logging.format)
        if args.command == "run":
            return _run(config)
        if args.command == "check-config":
            return _check(config)
        if args.command in ("import-keyring", "import-bundle"):
            return _import(config, args.command, args.file)
        if args.command == "events":
            return _events(config, args.n)
    except (LockerdError, HalError) as exc:
        print(f"lockerd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return EXIT_USAGE


def _run(config: Config) -> int:
    from lockerd.app import build_app

    async def go() -> None:
        app = build_app(config)
        await app.run()

    asyncio.run(go())
    return EXIT_OK


def _check(config: Config) -> int:
    from lockerd.app import prepare

    # The very checks `run` makes before it starts anything: what passes here starts.
    prepare(config)
    print(f"{config.source}: OK ({len(config.compartments)} compartments, "
          f"locker {config.locker.id})")
    return EXIT_OK


def _open_cache(config: Config) -> tuple[Database, CodeCache]:
    # Not lockerd.app: the daemon's whole graph (the hal, MQTT, the services) is not needed.
    from lockerd.services.banksetup import build_cache, open_bank_database

    db = open_bank_database(config)
    return db, build_cache(config, db=db)


def _import(config: Config, command: str, file: Path) -> int:
    try:
        # Refused before the database is opened (or made): a mistyped path changes nothing.
        with file.open("rb"):
            pass
    except OSError as exc:
        print(f"lockerd: cannot read {file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    db, cache = _open_cache(config)
    try:
        if command == "import-keyring":
            keyring = cache.load_keyring(file.read_bytes(), source=str(file))
            print(f"keyring version {keyring.version} accepted")
        else:
            if cache.keyring is None and config.trust.keyring_file:
                # A fresh database: take the keyring the daemon would load at startup.
                keyring_file = config.path(config.trust.keyring_file)
                cache.load_keyring(keyring_file.read_bytes(), source=str(keyring_file))
            # Read by the cache itself, which drops the file's bytes as soon as it can.
            bundle = cache.load_bundle_path(file, source=str(file))
            kind = "snapshot" if bundle.base_version is None else f"delta on {bundle.base_version}"
            print(f"codes bundle version {bundle.version} ({kind}, {bundle.upserted} codes, "
                  f"{bundle.revoked} revoked) applied")
    except OSError as exc:
        print(f"lockerd: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    except TrustError as exc:
        print(f"lockerd: {file} refused ({exc.reason}): {exc}", file=sys.stderr)
        print("lockerd: nothing was changed; the codes held stay in force", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        db.close()
    return EXIT_OK


def _events(config: Config, n: int) -> int:
    from lockerd.services.banksetup import DB_NAME
    from lockerd.store import EventLog, open_database

    path = config.state_dir / DB_NAME
    if not path.is_file():
        # Opening would create an empty database (and its directory): a wrong state_dir
        # would look like a bank with no events.
        raise StoreError(f"{path}: no database there; is [locker] state_dir in {config.source} "
                         "right? (the daemon creates it on its first run)")
    db = open_database(path)
    try:
        for event in EventLog(db).recent(n):
            print(json.dumps(event.wire(config.locker.id)))
    finally:
        db.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
