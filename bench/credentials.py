"""The credentials beyond a bundle code: verifying a QR token, scanning one to unlock, checking a
derived pickup code, and assigning a compartment to a deposit, each beside a baseline measured
in the same run. Prints figures; asserts nothing.

Parts 1, 3 and 4 run in this process on the daemon's own functions; part 2 drives a `lockerd run`
subprocess on the simulator through its control socket, timing scans and key presses the way
bench/sim_pickups.py has it (its Pickup record and log parser)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import os
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import base45  # type: ignore[import-untyped]  # no type hints shipped
import cbor2
from benchlib import (
    Daemon,
    Summary,
    exit_on_sigterm,
    filesystem_of,
    machine_line,
    report,
    start_daemon,
    stop_process,
    work_directory,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sim_pickups import (
    PULSE_S,
    SPRING_DELAY_S,
    STEP_TIMEOUT_S,
    Pickup,
    daemon_marks,
    intervals,
    provision_bank,
    wait_state,
)

from lockerd.app import build_app
from lockerd.config import load_config
from lockerd.core import messages
from lockerd.core.access import CompartmentView
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.deposit import assign
from lockerd.dev.provision import BankKit, PlainCode, make_bank
from lockerd.errors import TrustError
from lockerd.services.controller import Controller
from lockerd.services.credentials import CredentialService
from lockerd.timeutil import utcnow
from lockerd.trust.digest import code_digest, derived_pickup_code, support_code, support_window
from lockerd.trust.dsse import RoleKeys
from lockerd.trust.qrtoken import QR_PREFIX, mint_qr_token, verify_qr_token
from sim.client import SimClient

PARTS = ("qr", "scan", "derived", "assign", "support")
DERIVED_DIGITS = 8
SIZES = ("S", "M", "L")
SUBMIT_WARMUP = 30
"""Untimed submits of each kind first: more than the rejections' rate limiter lets through
(20), so no timed refusal commits a `code.rejected` event."""

# option: (default, with --quick)
COUNTS: dict[str, tuple[int, int]] = {
    "verifies": (5000, 500),
    "pickups": (1000, 30),
    "warmup": (16, 4),
    "checks": (2000, 200),
    "submits": (500, 50),
    "assigns": (2000, 200),
}
DEFAULT_DERIVED = (8, 64, 256)
DEFAULT_ASSIGN = (16, 128, 1024)
DEFAULT_SUPPORT = (8, 64, 256)
SUPPORT_TARGET = 1.1  # issue 13: a keypress with support codes on within 1.1x of off


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Four parts. (1) qr: verify_qr_token of a valid token, of garbage and of a "
        "token with one byte altered, beside a bare Ed25519 verify of the same signed bytes. "
        "(2) scan: a `lockerd run` subprocess on a simulated bank (spring delay 0); scanning a "
        "fresh pickup token to the door open, interleaved with keypad pickups (CODE# in one "
        "press, and '#' alone) timed as bench/sim_pickups.py has it. (3) derived: one "
        "entered code checked against the derived pickup codes of 8, 64, 256 parcels (one HMAC "
        "each), and Controller.submit of it with derived codes on and off, beside one HMAC + "
        "lookup of a bundle code. (4) assign: deposit.assign over 16, 128, 1024 compartments "
        "beside a bare loop over the same views. (5) support: a wrong code (bundle miss, derived "
        "miss, support tried: 3 HMACs per parcel) through Controller.submit with support codes "
        "on and off in turn, for 8, 64, 256 parcels, the ratio beside the 1.1x target, and the "
        "cost per candidate parcel. Prints figures; asserts nothing."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts, for a smoke test (a few seconds); counts given explicitly still win",
    )
    parser.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        metavar="P,P,...",
        help=f"parts to run, comma-separated ({','.join(PARTS)})",
    )
    parser.add_argument(
        "--verifies",
        type=int,
        default=None,
        metavar="N",
        help="qr: timed calls of each figure, interleaved (5000; --quick 500)",
    )
    parser.add_argument(
        "--pickups",
        type=int,
        default=None,
        metavar="N",
        help="scan: timed pickups of each kind (scan, CODE#, '#' alone), interleaved; also "
        "the number of `state` round trips of the baseline (1000; --quick 30)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        metavar="N",
        help="scan: untimed pickups of each kind before the timed ones (16; --quick 4)",
    )
    parser.add_argument(
        "--compartments",
        type=int,
        default=16,
        metavar="N",
        help="scan: compartments of the daemon's bank, used in turn (16)",
    )
    parser.add_argument(
        "--derived",
        type=_counts,
        default=list(DEFAULT_DERIVED),
        metavar="N,N,...",
        help="derived: compartments holding a parcel, one bank each (8,64,256)",
    )
    parser.add_argument(
        "--checks",
        type=int,
        default=None,
        metavar="N",
        help="derived: timed checks of each in-process figure per bank (2000; --quick 200)",
    )
    parser.add_argument(
        "--submits",
        type=int,
        default=None,
        metavar="N",
        help="derived: timed Controller.submit calls with derived codes on, and as many off, "
        "per bank (500; --quick 50)",
    )
    parser.add_argument(
        "--assign",
        type=_counts,
        default=list(DEFAULT_ASSIGN),
        metavar="N,N,...",
        help="assign: compartment counts (16,128,1024)",
    )
    parser.add_argument(
        "--assigns",
        type=int,
        default=None,
        metavar="N",
        help="assign: timed calls of each figure per count (2000; --quick 200)",
    )
    parser.add_argument(
        "--support",
        type=_counts,
        default=list(DEFAULT_SUPPORT),
        metavar="N,N,...",
        help="support: compartments holding a parcel, one bank each (8,64,256); --checks and "
        "--submits as for derived",
    )
    parser.add_argument(
        "--seed", type=int, default=1, metavar="N", help="seed of the assign views (1)"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="provision the banks under PATH, an empty or new directory, and keep them "
        "(default: a temporary directory, removed at exit); choose the disk whose fsync to "
        "measure",
    )
    args = parser.parse_args(argv)
    for name, (default, quick) in COUNTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    small = [
        n for n in ("verifies", "pickups", "checks", "submits", "assigns") if getattr(args, n) < 1
    ]
    if small or args.warmup < 0 or args.compartments < 1:
        parser.error(
            "--verifies, --pickups, --checks, --submits, --assigns and --compartments "
            "must be at least 1, --warmup at least 0"
        )
    return args


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are some of {','.join(PARTS)}, got {text!r}")
    return [p for p in PARTS if p in parts]


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not counts or counts[0] < 1 or counts[-1] > 100_000:
        raise argparse.ArgumentTypeError("counts must be between 1 and 100000")
    return counts


# -- output -----------------------------------------------------------------------------------


def header(unit: str, base: str) -> str:
    return f"  {'':<60}{'n':>6}{'median':>9}{'p99':>9}{'min':>9}{'max':>9}{base:>9}   ({unit})"


def row(label: str, values: Sequence[float], base: Sequence[float] | None, scale: float) -> str:
    """One figure: nearest-rank median, p99, min, max (times `scale`), and median / base's."""
    s = Summary.of(values)
    ratio = f"{s.median / Summary.of(base).median:>9.2f}" if base else f"{'':>9}"
    v = [x * scale for x in (s.median, s.p99, s.min, s.max)]
    digits = 3 if scale == 1e3 else 1
    cells = "".join(f"{x:>9.{digits}f}" for x in v)
    return f"  {label:<60}{s.n:>6}{cells}{ratio}"


def timed_round_robin(
    calls: Sequence[Callable[[], object]], n: int, warmup: int = 50
) -> list[list[float]]:
    """Time `n` calls of each function, interleaved one by one (the first of each turn
    rotating), so that every figure sees the same caches and the same moments of the
    machine. `warmup` untimed turns first."""
    for _ in range(warmup):
        for call in calls:
            call()
    gc.collect()
    samples: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    perf = time.perf_counter
    for i in range(n):
        shift = i % len(order)
        for j in order[shift:] + order[:shift]:
            call = calls[j]
            t0 = perf()
            call()
            samples[j].append(perf() - t0)
    return samples


# -- 1. QR token verification -----------------------------------------------------------------


@dataclass
class QrResult:
    token_chars: int
    cose_bytes: int
    signed_bytes: int
    reasons: dict[str, str]
    samples: dict[str, list[float]]


def refusal_reason(text: str, check: Callable[[str], object]) -> str:
    try:
        check(text)
    except TrustError as exc:
        return exc.reason
    raise RuntimeError(f"token {text[:40]!r}... was accepted; it is meant to be refused")


def measure_qr(n: int) -> QrResult:
    signer = Ed25519PrivateKey.generate()
    public = signer.public_key()
    role = RoleKeys.from_keys([public], 1)
    now = utcnow()
    keyring_expires = now + timedelta(days=365)
    token = mint_qr_token(
        signer=signer,
        locker_id="L1",
        kind="pickup",
        cti=secrets.token_bytes(16),
        expires_at=now + timedelta(hours=1),
        compartment="7",
    )
    # What verify_qr_token verifies: the Sig_structure of RFC 9052 over the token's protected
    # header and payload. The bare baseline verifies exactly these bytes and signature.
    cose = base45.b45decode(token.removeprefix(QR_PREFIX))
    tagged = cbor2.loads(cose)
    protected, _, payload, signature = tagged.value
    message = cbor2.dumps(["Signature1", protected, b"", payload])
    public.verify(signature, message)
    # One byte altered: the last byte of the COSE_Sign1, that is of the signature, so the
    # whole structure parses and only the Ed25519 check refuses it (the costliest refusal).
    altered_cose = bytearray(cose)
    altered_cose[-1] ^= 0x01
    altered = QR_PREFIX + base45.b45encode(bytes(altered_cose)).decode("ascii")
    garbage = QR_PREFIX + "A" * 1000

    def verify(text: str) -> object:
        return verify_qr_token(
            text, qr_role=role, keyring_expires_at=keyring_expires, locker_id="L1", now=now
        )

    def refuse(text: str) -> Callable[[], object]:
        def call() -> object:
            try:
                verify(text)
            except TrustError as exc:
                return exc
            raise RuntimeError("a token meant to be refused was accepted")

        return call

    def bare_verify() -> None:
        public.verify(signature, message)

    def bare_decode() -> object:
        return cbor2.loads(base45.b45decode(token[len(QR_PREFIX) :]))

    reasons = {
        "garbage": refusal_reason(garbage, verify),
        "altered": refusal_reason(altered, verify),
    }
    if reasons["altered"] != "signature":
        raise RuntimeError(
            f"the altered token was refused as {reasons['altered']}, expected "
            "signature: the alteration did not reach the signature"
        )
    calls: dict[str, Callable[[], object]] = {
        "bare": bare_verify,
        "decode": bare_decode,
        "valid": lambda: verify(token),
        "garbage": refuse(garbage),
        "altered": refuse(altered),
    }
    samples = timed_round_robin(list(calls.values()), n)
    return QrResult(
        token_chars=len(token),
        cose_bytes=len(cose),
        signed_bytes=len(message),
        reasons=reasons,
        samples=dict(zip(calls, samples, strict=True)),
    )


def report_qr(r: QrResult) -> None:
    s = r.samples
    print(f"1. QR token verification, in-process, {len(s['valid'])} calls of each, interleaved")
    print(
        f"  valid pickup token: {r.token_chars} characters, COSE_Sign1 {r.cose_bytes} bytes, "
        f"{r.signed_bytes} bytes signed (the Sig_structure)"
    )
    print(header("us", "x bare"))
    print(
        row(
            f"baseline: Ed25519 public_key.verify, {r.signed_bytes} bytes",
            s["bare"],
            s["bare"],
            1e6,
        )
    )
    print(row("reference: base45 decode + cbor2.loads, no checks", s["decode"], s["bare"], 1e6))
    print(row("verify_qr_token, valid token", s["valid"], s["bare"], 1e6))
    print(
        row(f"refused: 'LK1:' + 'A' * 1000 ({r.reasons['garbage']})", s["garbage"], s["bare"], 1e6)
    )
    print(
        row(
            f"refused: last signature byte altered ({r.reasons['altered']})",
            s["altered"],
            s["bare"],
            1e6,
        )
    )
    extra = Summary.of(s["valid"]).median - Summary.of(s["bare"]).median
    print(
        f"  verify_qr_token spends {extra * 1e6:.1f} us beyond the bare signature check "
        "(decoding, structural and claim checks, kid lookup, Sig_structure)"
    )
    print(flush=True)


# -- 2. scan to unlock, end to end ------------------------------------------------------------

KINDS = ("scan", "burst", "hash")
KIND_LABELS = {
    "scan": "scan of a fresh token",
    "burst": "CODE# in one press",
    "hash": "'#' alone (digits typed)",
}


async def one_pickup(
    sim: SimClient, credential: str, cid: str, daemon: Daemon, kind: str, *, timed: bool
) -> Pickup:
    """One pickup on compartment `cid`, as bench/sim_pickups.py has it: kind "scan" sends
    `credential` (a token) in one `scan`; "burst" sends CODE# in one `press`; "hash" types the
    digits untimed first and times the '#' alone. Timed from sending the request to the first
    `state` reply with the door open, and to the first showing "Door N is open" (the screen
    shown once pickup.opened is committed). The screens waited for are built by the daemon's
    own `messages` functions, so a change of wording cannot stall the benchmark."""
    # Untimed: the compartment is shut and latched (its previous pulse may still be running).
    await wait_state(
        sim,
        lambda s: s["compartments"][cid]["locked"] and not s["compartments"][cid]["door_open"],
        f"door {cid} latched",
        daemon,
    )
    send = sim.scan if kind == "scan" else sim.press
    data = credential if kind == "scan" else credential + "#"
    if kind == "hash":
        typed = messages.typing(len(credential)).text
        await sim.press(credential)
        await wait_state(sim, lambda s: s["display"] == typed, "digits typed", daemon)
        data = "#"
    opened_text = messages.pickup_open(cid).text
    open_s: float | None = None
    polls = 0
    deadline = time.monotonic() + STEP_TIMEOUT_S
    pressed_at = time.time()
    t0 = time.perf_counter()
    await send(data)
    while True:
        state = await sim.state()
        now = time.perf_counter()
        polls += 1
        if open_s is None and state["compartments"][cid]["door_open"]:
            open_s = now - t0
        if open_s is not None and state["display"] == opened_text:
            committed_s = now - t0
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{KIND_LABELS[kind]} for compartment {cid} did not open it; display "
                f"{state['display']!r}\ndaemon log:\n{daemon.log_tail()}"
            )
    # Untimed: the door closes on the parcel. The daemon records door.closed and
    # pickup.incomplete and gives the use back (the code works again; a token's cti is no
    # longer spent); wait until it shows that, that is until it has committed it.
    incomplete = messages.pickup_incomplete(cid).text
    await sim.door(cid, "close")
    await wait_state(
        sim, lambda s: s["display"] == incomplete, f"door {cid} closed on its parcel", daemon
    )
    assert open_s is not None
    return Pickup(kind if timed else "warmup", cid, open_s, committed_s, polls, pressed_at)


@dataclass
class ScanResult:
    state: list[float]
    pickups: list[Pickup]
    started_s: float
    codes: int
    steps: dict[str, dict[str, list[float]]] = field(default_factory=dict)


async def drive_scans(kit: BankKit, daemon: Daemon, args: argparse.Namespace) -> ScanResult:
    ids = list(kit.compartments)
    codes: dict[str, list[str]] = {cid: [] for cid in ids}
    for c in kit.codes:
        codes[c.compartment or ""].append(c.code)
    total = len(KINDS) * (args.warmup + args.pickups)
    # Minted untimed, one fresh token (new cti) per scan, for the compartment it will open.
    tokens = iter(
        [
            kit.qr_token(
                "pickup", compartment=ids[k % len(ids)], expires_at=utcnow() + timedelta(hours=2)
            )
            for k in range(total)
            if KINDS[k % len(KINDS)] == "scan"
        ]
    )
    async with SimClient(kit.socket_path, timeout=STEP_TIMEOUT_S) as sim:
        state: list[float] = []
        for _ in range(args.pickups):
            t0 = time.perf_counter()
            await sim.state()
            state.append(time.perf_counter() - t0)
        pickups: list[Pickup] = []
        # Kinds in turn, compartments in turn: pickup k is of kind k % 3 on compartment
        # k % C, so a compartment's pulse is long over when it comes round again.
        for k in range(total):
            kind = KINDS[k % len(KINDS)]
            cid = ids[k % len(ids)]
            credential = (
                next(tokens) if kind == "scan" else codes[cid][(k // len(ids)) % len(codes[cid])]
            )
            pickups.append(
                await one_pickup(
                    sim, credential, cid, daemon, kind, timed=k >= len(KINDS) * args.warmup
                )
            )
    return ScanResult(
        state=state, pickups=pickups, started_s=daemon.started_s, codes=len(kit.codes)
    )


def measure_scan(work: Path, args: argparse.Namespace) -> ScanResult:
    # The bank of bench/sim_pickups.py, so that its keypad figures and these look codes up
    # in a cache of the same size.
    kit = provision_bank(work / "scan-bank", args)
    daemon = start_daemon(kit)
    try:
        result = asyncio.run(drive_scans(kit, daemon, args))
    finally:
        code = stop_process(daemon.proc)
    if code != 0:
        raise RuntimeError(f"the daemon exited with status {code}:\n{daemon.log_tail()}")
    marks = daemon_marks(daemon.log_path, result.pickups)
    if marks:
        result.steps = {kind: intervals(result.pickups, marks, kind) for kind in KINDS}
    return result


def report_scan(r: ScanResult, args: argparse.Namespace) -> None:
    by_kind = {kind: [p for p in r.pickups if p.phase == kind] for kind in KINDS}
    hashed = [p.open_s for p in by_kind["hash"]]
    hashed_shown = [p.committed_s for p in by_kind["hash"]]
    print(
        f"2. scan to unlock, end to end: `lockerd run` on {args.compartments} simulated "
        f"compartments ({r.codes} codes), {args.pickups} timed pickups of each kind, "
        f"interleaved (+{args.warmup} warm-up each)"
    )
    print(
        f"  simulator spring_delay_s = {SPRING_DELAY_S:g}; doors.pulse_s = {PULSE_S:g}; daemon "
        f"up in {r.started_s:.2f} s; each pickup timed from sending the request to the first "
        "`state` reply showing it"
    )
    print(header("ms", "x '#'"))
    print(row("baseline: sim `state` round trip (daemon, no input)", r.state, None, 1e3))
    for kind in KINDS:
        opens = [p.open_s for p in by_kind[kind]]
        print(row(f"{KIND_LABELS[kind]} -> door open", opens, hashed, 1e3))
        print(
            row(
                f"{KIND_LABELS[kind]} -> 'Door N is open'",
                [p.committed_s for p in by_kind[kind]],
                hashed_shown,
                1e3,
            )
        )
    if r.steps:
        print("inside the daemon (its log timestamps):")
        for kind in KINDS:
            steps = list(r.steps[kind].values())
            print(
                row(
                    f"{KIND_LABELS[kind]}: sent -> access granted",
                    steps[0],
                    r.steps["hash"][next(iter(r.steps["hash"]))],
                    1e3,
                )
            )
        steps = list(r.steps["scan"].values())
        print(row("scan: granted -> lock.pulse committed", steps[1], None, 1e3))
    scan = Summary.of([p.open_s for p in by_kind["scan"]]).median
    burst = Summary.of([p.open_s for p in by_kind["burst"]]).median
    hash_ = Summary.of(hashed).median
    print(
        f"  scan -> door open: {(scan - hash_) * 1e3:+.3f} ms against '#' alone (one input "
        f"event each), {(scan - burst) * 1e3:+.3f} ms against CODE# in one press"
    )
    print(flush=True)


# -- 3. derived pickup codes ------------------------------------------------------------------


class FrozenClock:
    """Monotonic and wall time that stand still. The rejections' rate limiter (20 a minute)
    then never refills: after the untimed warm-up no refusal commits a `code.rejected` event,
    so every timed submit does the same work."""

    def __init__(self) -> None:
        self._wall = datetime.now(UTC)

    def monotonic(self) -> float:
        return 1000.0

    def wall(self) -> datetime:
        return self._wall


@dataclass
class DerivedResult:
    parcels: int
    bundle: list[float]
    views: list[float]
    loop: list[float]
    check: list[float]
    submit_on: list[float]
    submit_off: list[float]


def make_derived_bank(directory: Path, parcels: int) -> tuple[BankKit, list[str]]:
    """A bank of `parcels` compartments, derived pickup codes on, a bundle code for each."""
    codes = unique_codes(parcels + 1, DERIVED_DIGITS)
    plain = [
        PlainCode(id=f"p-{i}", code=code, compartment=str(i), parcel_id=f"PX-{i}")
        for i, code in enumerate(codes[:parcels], start=1)
    ]
    kit = make_bank(
        directory,
        compartments=parcels,
        codes=plain,
        socket=False,
        overrides={
            "codes": {"derived_pickup": True, "derived_digits": DERIVED_DIGITS},
            # Every timed submit is a wrong code: no lockout may cut the path short.
            "lockout": {"free_attempts": 1_000_000_000},
        },
    )
    return kit, codes


def unique_codes(count: int, digits: int) -> list[str]:
    rng = random.Random(count)
    out: dict[str, None] = {}
    while len(out) < count:
        out[str(rng.randrange(10**digits)).zfill(digits)] = None
    return list(out)


def fill_every_compartment(ctl: Controller) -> None:
    """Give each compartment a parcel, so the derived-code loop has one HMAC per compartment."""
    for cid, comp in ctl.compartments.items():
        comp.parcel_id = f"PX-{cid}"
        comp.occupied = True


def unmatched_code(kit: BankKit, codes: Sequence[str], compartments: Iterable[str],
                   parcels: int) -> str:
    """An entered code that is neither a bundle code nor any parcel's derived code."""
    key, locker = kit.code_key, kit.locker_id
    derived = {
        derived_pickup_code(key, locker, f"PX-{cid}", DERIVED_DIGITS) for cid in compartments
    }
    return next(
        c
        for c in unique_codes(parcels + 100, DERIVED_DIGITS)[parcels + 1 :]
        if c not in derived and c not in codes
    )


async def time_submits(
    ctl: Controller, wrong: str, submits: int
) -> tuple[list[float], list[float]]:
    """Controller.submit of `wrong` with derived codes on and off in turn: (on, off) seconds."""
    # Off: the controller's rules without derived_digits.
    on = ctl.rules
    off = replace(on, derived_digits=None)
    submit_on: list[float] = []
    submit_off: list[float] = []
    for i in range(submits + SUBMIT_WARMUP):
        pair = ((on, submit_on), (off, submit_off))
        for rules, out in pair if i % 2 == 0 else pair[::-1]:
            ctl.rules = rules
            t0 = time.perf_counter()
            await ctl.submit(wrong, source="keypad")
            elapsed = time.perf_counter() - t0
            if i >= SUBMIT_WARMUP:
                out.append(elapsed)
    ctl.rules = on
    return submit_on, submit_off


async def measure_derived(work: Path, parcels: int, args: argparse.Namespace) -> DerivedResult:
    kit, codes = make_derived_bank(work / f"derived-{parcels}", parcels)
    app = build_app(load_config(kit.config_path), clock=FrozenClock())
    try:
        await app.load_bundle_file()  # what `run` does before it serves the doors
        ctl = app.controller
        fill_every_compartment(ctl)
        key, locker = kit.code_key, kit.locker_id
        # The worst case, every parcel's HMAC is computed (a match stops at its compartment).
        wrong = unmatched_code(kit, codes, ctl.compartments, parcels)
        issued = codes[parcels - 1]
        if app.codes.lookup(code_digest(key, locker, issued)) is None:
            raise RuntimeError("the bundle code is not in the code store")
        if app.codes.lookup(code_digest(key, locker, wrong)) is not None:
            raise RuntimeError("the wrong code is in the code store")

        def bundle_fast_path() -> object:
            # Controller.submit's first step, for a code the bundle holds.
            return app.codes.lookup(code_digest(key, locker, issued))

        def views() -> dict[str, CompartmentView]:
            # Bank.views, built before every decision.
            return {cid: c.view() for cid, c in ctl.compartments.items()}

        held = views()

        def derived_loop(code: str, views: Mapping[str, CompartmentView]) -> str | None:
            # CredentialService._derived's loop, up to the match (none here).
            for cid, view in views.items():
                parcel_id = view.parcel_id
                if parcel_id is None:
                    continue
                expected = derived_pickup_code(key, locker, parcel_id, DERIVED_DIGITS)
                if hmac.compare_digest(expected, code):
                    return cid
            return None

        def whole_check() -> object:
            record = app.codes.lookup(code_digest(key, locker, wrong))
            return record or derived_loop(wrong, views())

        found = derived_loop(wrong, held)
        if found is not None:
            raise RuntimeError(f"the wrong code matched compartment {found}")
        bundle, built, looped, check = timed_round_robin(
            [bundle_fast_path, views, lambda: derived_loop(wrong, held), whole_check], args.checks
        )

        # The real path: Controller.submit of the wrong code (bundle miss, derived loop,
        # refusal: lockout state saved, log line, display).
        submit_on, submit_off = await time_submits(ctl, wrong, args.submits)
        await ctl.wait_pulses()
        if any(e.type == "lock.pulse" for e in app.events.recent(100_000)):
            raise RuntimeError("a wrong code pulsed a lock")
        return DerivedResult(
            parcels=parcels,
            bundle=bundle,
            views=built,
            loop=looped,
            check=check,
            submit_on=submit_on,
            submit_off=submit_off,
        )
    finally:
        app.db.close()


def report_derived(results: Sequence[DerivedResult]) -> None:
    print(
        "3. derived pickup codes, in-process on a built app (not running), a parcel in "
        "every compartment; the entered code matches none (every parcel's HMAC computed)"
    )
    print(header("us", "x bundle"))
    for r in results:
        print(f"  {r.parcels} compartments holding a parcel")
        print(row("baseline: code_digest + CodeStore.lookup, bundle code", r.bundle, r.bundle, 1e6))
        print(row("building the views, as Bank.views", r.views, r.bundle, 1e6))
        print(
            row(f"derived loop: {r.parcels} x derived_pickup_code + compare", r.loop, r.bundle, 1e6)
        )
        print(row("whole check: digest + lookup (miss) + views + loop", r.check, r.bundle, 1e6))
        print(row("Controller.submit of it, derived off (refused)", r.submit_off, r.bundle, 1e6))
        print(row("Controller.submit of it, derived on (refused)", r.submit_on, r.bundle, 1e6))
        per = Summary.of(r.loop).median / r.parcels
        gap = Summary.of(r.submit_on).median - Summary.of(r.submit_off).median
        print(
            f"    derived loop {per * 1e6:.2f} us per parcel; Controller.submit with derived "
            f"codes on: {gap * 1e6:+.0f} us against off"
        )
    print(flush=True)


# -- 4. assignment ----------------------------------------------------------------------------


@dataclass
class AssignResult:
    compartments: int
    free: int
    chosen: str
    bare: list[float]
    assigned: list[float]
    views: list[float]


def measure_assign(count: int, n: int, seed: int) -> AssignResult:
    """A bank of `count` compartments, sizes S, M, L in turn, half of them (seeded) holding a
    parcel; a deposit of size M asks for the smallest free compartment of M or larger."""
    rng = random.Random(seed * 1_000_003 + count)
    timings = DoorTimings(open_timeout_s=4.0, held_open_after_s=120.0, show_result_s=6.0)
    full = set(rng.sample(range(count), count // 2))
    comps = {
        str(i + 1): Compartment(
            str(i + 1),
            timings=timings,
            occupied=i in full,
            size=SIZES[i % len(SIZES)],
            parcel_id=f"PX-{i + 1}" if i in full else None,
        )
        for i in range(count)
    }
    views = {cid: c.view() for cid, c in comps.items()}
    chosen = assign(views, SIZES, size="M")
    if not isinstance(chosen, str):
        raise RuntimeError(f"no compartment assigned among {count}: {chosen}")

    def bare() -> int:
        # The floor: one pass over the same views, reading what assign reads first.
        free = 0
        for view in views.values():
            if view.free:
                free += 1
        return free

    samples = timed_round_robin(
        [
            bare,
            lambda: assign(views, SIZES, size="M"),
            lambda: {cid: c.view() for cid, c in comps.items()},
        ],
        n,
    )
    return AssignResult(
        compartments=count,
        free=bare(),
        chosen=chosen,
        bare=samples[0],
        assigned=samples[1],
        views=samples[2],
    )


def report_assign(results: Sequence[AssignResult]) -> None:
    print(
        "4. deposit assignment, in-process: assign(views, ('S', 'M', 'L'), size='M'); sizes "
        "S, M, L in turn, half the compartments (seeded) holding a parcel"
    )
    print(header("us", "x bare"))
    for r in results:
        print(f"  {r.compartments} compartments, {r.free} free; assigned {r.chosen}")
        print(row("baseline: bare loop reading view.free", r.bare, r.bare, 1e6))
        print(row("assign(views, sizes, size='M')", r.assigned, r.bare, 1e6))
        print(row("building the views, as Bank.views", r.views, r.bare, 1e6))
    print(flush=True)


# -- 5. support codes -------------------------------------------------------------------------


@dataclass
class SupportResult:
    parcels: int
    candidates: list[float]
    decide_off: list[float]
    decide_on: list[float]
    cold: list[float]
    submit_on: list[float]
    submit_off: list[float]


def make_support_bank(directory: Path, parcels: int) -> tuple[BankKit, list[str]]:
    """As make_derived_bank, with support codes on too: every parcel is a candidate twice
    over (on record, and named by its bundle code)."""
    kit, codes = make_derived_bank(directory, parcels)
    text = kit.config_path.read_text(encoding="utf-8")
    kit.config_path.write_text(text.replace("derived_pickup = true",
                                            "derived_pickup = true\nsupport_codes = true"),
                               encoding="utf-8")
    return kit, codes


def _code_matching_nothing(kit: BankKit, codes: Iterable[str], compartments: Iterable[str],
                           window: int, parcels: int) -> str:
    """A code that is no bundle code, no derived code and no support code of this bank."""
    key, locker = kit.code_key, kit.locker_id
    taken = set(codes)
    for cid in compartments:
        taken.add(derived_pickup_code(key, locker, f"PX-{cid}", DERIVED_DIGITS))
        taken.update(support_code(key, locker, f"PX-{cid}", w, DERIVED_DIGITS)
                     for w in (window - 1, window, window + 1))
    return next(c for c in unique_codes(parcels * 5 + 100, DERIVED_DIGITS) if c not in taken)


async def _time_support_submits(ctl: Controller, service: CredentialService, wrong: str,
                                submits: int) -> tuple[list[float], list[float]]:
    """Controller.submit of `wrong` with support codes on and off in turn (on, off)."""
    submit_on: list[float] = []
    submit_off: list[float] = []
    for i in range(submits + SUBMIT_WARMUP):
        pair = ((DERIVED_DIGITS, submit_on), (None, submit_off))
        for digits, out in pair if i % 2 == 0 else pair[::-1]:
            service.support_digits = digits
            t0 = time.perf_counter()
            await ctl.submit(wrong, source="keypad")
            elapsed = time.perf_counter() - t0
            if i >= SUBMIT_WARMUP:
                out.append(elapsed)
    return submit_on, submit_off


async def measure_support(work: Path, parcels: int, args: argparse.Namespace) -> SupportResult:
    kit, codes = make_support_bank(work / f"support-{parcels}", parcels)
    clock = FrozenClock()
    app = build_app(load_config(kit.config_path), clock=clock)
    try:
        await app.load_bundle_file()  # what `run` does before it serves the doors
        ctl, service = app.controller, app.controller.credentials
        if service.support_digits != DERIVED_DIGITS:
            raise RuntimeError("support codes are not on in the bank's configuration")
        for cid, comp in ctl.compartments.items():
            comp.parcel_id = f"PX-{cid}"
            comp.occupied = True
        key, locker, now = kit.code_key, kit.locker_id, clock.wall()
        window = support_window(now.timestamp())
        wrong = _code_matching_nothing(kit, codes, ctl.compartments, window, parcels)
        held = {cid: c.view() for cid, c in ctl.compartments.items()}
        if len(app.codes.parcels_with_pickup_codes()) != parcels:
            raise RuntimeError("the support bank is not as intended")

        def candidates() -> object:
            # The bundle's side of the candidate parcels: kept by the store between changes.
            return app.codes.parcels_with_pickup_codes()

        def decide(digits: int | None) -> Callable[[], object]:
            # CredentialService.code of the wrong code: bundle miss, derived miss, support.
            def call() -> object:
                service.support_digits = digits
                return service.code(wrong, source="keypad", views=held, now=now,
                                    derived_digits=DERIVED_DIGITS)
            return call

        def cold() -> None:
            # What a new window costs once per parcel: its three codes computed.
            for cid in held:
                for w in (window - 1, window, window + 1):
                    hmac.compare_digest(
                        support_code(key, locker, f"PX-{cid}", w, DERIVED_DIGITS), wrong)

        listed, off, on, computed = timed_round_robin(
            [candidates, decide(None), decide(DERIVED_DIGITS), cold], args.checks)

        # The real path, as part 3: Controller.submit of the wrong code with support codes
        # on and off in turn (derived codes on in both), so the gap is what support adds.
        submit_on, submit_off = await _time_support_submits(ctl, service, wrong, args.submits)
        await ctl.wait_pulses()
        if any(e.type == "lock.pulse" for e in app.events.recent(100_000)):
            raise RuntimeError("a wrong code pulsed a lock")
        return SupportResult(parcels=parcels, candidates=listed, decide_off=off, decide_on=on,
                             cold=computed, submit_on=submit_on, submit_off=submit_off)
    finally:
        app.db.close()


def report_support(results: Sequence[SupportResult]) -> None:
    print(
        "5. support codes, in-process on a built app (not running), a parcel and its bundle "
        "code in every compartment, derived codes on; the entered code matches nothing"
    )
    print(header("us", "x off"))
    for r in results:
        print(f"  {r.parcels} compartments holding a parcel")
        print(row("Controller.submit of it, support off (refused)", r.submit_off, r.submit_off,
                  1e6))
        print(row("Controller.submit of it, support on (refused)", r.submit_on, r.submit_off,
                  1e6))
        print(row("CredentialService.code of it, support off", r.decide_off, r.decide_off, 1e6))
        print(row("CredentialService.code of it, support on", r.decide_on, r.decide_off, 1e6))
        print(row("candidates: CodeStore.parcels_with_pickup_codes (kept)", r.candidates,
                  r.decide_off, 1e6))
        print(row(f"a new window: {3 * r.parcels} x support_code + compare", r.cold,
                  r.decide_off, 1e6))
        ratio = Summary.of(r.submit_on).median / Summary.of(r.submit_off).median
        added = Summary.of(r.decide_on).median - Summary.of(r.decide_off).median
        print(
            f"    per candidate parcel {added / r.parcels * 1e6:.2f} us a keypress, "
            f"{Summary.of(r.cold).median / r.parcels * 1e6:.2f} us once a window (3 HMACs)"
        )
        report(f"credentials support {r.parcels} parcels",
               f"Controller.submit of a wrong code {Summary.of(r.submit_on).median * 1e6:.0f} "
               f"us with support codes on against {Summary.of(r.submit_off).median * 1e6:.0f} "
               "us off", ratio, SUPPORT_TARGET)
    print(flush=True)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    started = time.perf_counter()
    status = 0
    try:
        # Part 3's controller logs every refusal: to the work directory's log file.
        with work_directory(args.dir) as work:
            load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"credentials: parts {', '.join(args.parts)}{' (--quick)' if args.quick else ''}")
            print(f"  {machine_line()}")
            print(
                f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; banks in {work} "
                f"({filesystem_of(work)}); load average {load_start}"
            )
            print(
                "  nearest-rank percentiles; in-process figures timed one call at a time with "
                "time.perf_counter, interleaved"
            )
            print(flush=True)
            if "qr" in args.parts:
                report_qr(measure_qr(args.verifies))
            if "scan" in args.parts:
                report_scan(measure_scan(work, args), args)
            if "derived" in args.parts:
                derived = [asyncio.run(measure_derived(work, n, args)) for n in args.derived]
                report_derived(derived)
            if "assign" in args.parts:
                report_assign([measure_assign(n, args.assigns, args.seed) for n in args.assign])
            if "support" in args.parts:
                report_support([asyncio.run(measure_support(work, n, args))
                                for n in args.support])
            print(
                f"  whole run: {time.perf_counter() - started:.0f} s; load average "
                f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the start: {load_start})"
            )
    except RuntimeError as exc:
        print(f"credentials: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("credentials: interrupted", file=sys.stderr)
        status = 130
    return status


if __name__ == "__main__":
    sys.exit(main())
