"""Pure codec of the Kerong CU16 frames (PROTOCOL.md section 10): bytes in, values out, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

STX: Final = 0x02
ETX: Final = 0x03
CMD_STATUS: Final = 0x30
CMD_UNLOCK: Final = 0x31
CMD_REPLY: Final = 0x35
REQUEST_LEN: Final = 5
REPLY_LEN: Final = 9
MAX_BOARD: Final = 15
MAX_LOCK: Final = 15
LOCKS_PER_BOARD: Final = 16


def checksum(data: Iterable[int]) -> int:
    """The frame checksum: the low byte of the sum of all preceding bytes."""
    return sum(data) & 0xFF


def _check_board(board: int) -> None:
    if isinstance(board, bool) or not isinstance(board, int) or not 0 <= board <= MAX_BOARD:
        raise ValueError(f"board must be an int 0-{MAX_BOARD}, not {board!r}")


def _check_lock(lock: int) -> None:
    if isinstance(lock, bool) or not isinstance(lock, int) or not 0 <= lock <= MAX_LOCK:
        raise ValueError(f"lock must be an int 0-{MAX_LOCK}, not {lock!r}")


def _check_bits(name: str, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 0xFFFF:
        raise ValueError(f"{name} must be a 16-bit unsigned int, not {bits!r}")


def _frame(addr: int, cmd: int) -> bytes:
    head = bytes((STX, addr, cmd, ETX))
    return head + bytes((checksum(head),))


def encode_unlock(board: int, lock: int) -> bytes:
    """`02 ((b<<4)|n) 31 03 SUM`: release lock `lock` of board `board`.

    Boards differ in what follows: most send nothing, some send a status reply (the same
    9-byte frame as for a status query, ADDR possibly carrying the lock number)."""
    _check_board(board)
    _check_lock(lock)
    return _frame((board << 4) | lock, CMD_UNLOCK)


def encode_status(board: int) -> bytes:
    """`02 (b<<4) 30 03 SUM`: ask board `board` for its lock and infrared bits."""
    _check_board(board)
    return _frame(board << 4, CMD_STATUS)


@dataclass(frozen=True, slots=True)
class StatusReply:
    """A board's answer to a status query: one latch bit and one infrared bit per lock.

    Lock 0 (the board's "lock 1") is bit 0 of the first byte, so `lock_bits >> n & 1` is lock n.
    What a latch bit value means (engaged or released) depends on the board revision.
    """

    board: int
    lock_bits: int
    ir_bits: int

    def __post_init__(self) -> None:
        _check_board(self.board)
        _check_bits("lock_bits", self.lock_bits)
        _check_bits("ir_bits", self.ir_bits)

    def lock_bit(self, lock: int) -> int:
        _check_lock(lock)
        return (self.lock_bits >> lock) & 1

    def ir_bit(self, lock: int) -> int:
        _check_lock(lock)
        return (self.ir_bits >> lock) & 1


def encode_reply(reply: StatusReply, *, lock: int = 0) -> bytes:
    """`02 ADDR 35 L1-8 L9-16 IR1-8 IR9-16 03 SUM`, as a board sends it (emulators, tests).

    `lock` goes into the low nibble of ADDR, as some boards do when answering an unlock;
    decoding takes the board from the high nibble and ignores it."""
    _check_lock(lock)
    body = bytes(
        (
            STX,
            (reply.board << 4) | lock,
            CMD_REPLY,
            reply.lock_bits & 0xFF,
            reply.lock_bits >> 8,
            reply.ir_bits & 0xFF,
            reply.ir_bits >> 8,
            ETX,
        )
    )
    return body + bytes((checksum(body),))


@dataclass(frozen=True, slots=True)
class Request:
    """A frame the host sends: `cmd` is CMD_STATUS or CMD_UNLOCK (lock is 0 for a status)."""

    board: int
    lock: int
    cmd: int


class _Resync:
    """Shared framing: find STX, check a fixed-length candidate, on failure slide by ONE byte.

    Sliding by one byte (not a whole frame) is what keeps a valid frame that starts inside a
    rejected candidate (garbage that happened to contain STX) from being lost.
    """

    length: int = 0

    def __init__(self) -> None:
        self._buf = bytearray()
        self.bad_checksums = 0
        """Candidates with the right shape but a wrong checksum, discarded."""
        self.discarded_bytes = 0
        """Bytes skipped while resynchronising (noise, echoes, broken frames)."""
        self.frames = 0
        """Valid frames decoded."""

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame (never a whole frame's worth)."""
        return len(self._buf)

    def _shape_ok(self, cand: bytes) -> bool:
        raise NotImplementedError

    def _frames(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        try:
            self._buf += data
        except TypeError:
            # Not bytes at all: nothing a serial port could deliver. Dropping it keeps the
            # promise that feeding the decoder never raises.
            return []
        out: list[bytes] = []
        buf = self._buf
        while buf:
            start = buf.find(STX)
            if start < 0:
                self.discarded_bytes += len(buf)
                buf.clear()
                break
            if start:
                self.discarded_bytes += start
                del buf[:start]
            if len(buf) < self.length:
                break  # wait for the rest; the buffer never holds more than one frame's worth
            cand = bytes(buf[: self.length])
            if not self._shape_ok(cand):
                self.discarded_bytes += 1
                del buf[:1]
                continue
            if checksum(cand[:-1]) != cand[-1]:
                self.bad_checksums += 1
                self.discarded_bytes += 1
                del buf[:1]
                continue
            self.frames += 1
            del buf[: self.length]
            out.append(cand)
        return out

    def reset(self) -> None:
        """Forget a partial frame (after the port was reopened)."""
        self._buf.clear()


class FrameDecoder(_Resync):
    """Turns the byte stream from the bus into StatusReply values.

    `feed` never raises: garbage before, between or inside frames is skipped (resynchronising on
    STX), a reply with a bad checksum is discarded and counted in `bad_checksums`, and every
    valid reply is returned in order.
    """

    length = REPLY_LEN

    def _shape_ok(self, cand: bytes) -> bool:
        return cand[2] == CMD_REPLY and cand[7] == ETX

    def feed(self, data: bytes | bytearray | memoryview) -> list[StatusReply]:
        return [
            StatusReply(
                board=frame[1] >> 4,
                lock_bits=frame[3] | (frame[4] << 8),
                ir_bits=frame[5] | (frame[6] << 8),
            )
            for frame in self._frames(data)
        ]


class RequestDecoder(_Resync):
    """Turns the byte stream a board hears into Request values (for emulators and captures).

    Same rules as FrameDecoder: never raises, resynchronises on STX, drops bad checksums.
    """

    length = REQUEST_LEN

    def _shape_ok(self, cand: bytes) -> bool:
        return cand[2] in (CMD_STATUS, CMD_UNLOCK) and cand[3] == ETX

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]:
        return [
            Request(board=frame[1] >> 4, lock=frame[1] & 0x0F, cmd=frame[2])
            for frame in self._frames(data)
        ]
