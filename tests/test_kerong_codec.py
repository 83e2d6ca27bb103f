"""Tests of the Kerong CU16 codec: PROTOCOL.md section 10 byte for byte, resync, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hal.kerong.codec import (
    CMD_REPLY,
    CMD_STATUS,
    CMD_UNLOCK,
    FrameDecoder,
    Request,
    RequestDecoder,
    StatusReply,
    checksum,
    encode_reply,
    encode_status,
    encode_unlock,
)

pytestmark = pytest.mark.unit

# -- PROTOCOL.md section 10, as tables ---------------------------------------------------------


@pytest.mark.parametrize(
    ("board", "lock", "frame"),
    [
        (0, 5, "02 05 31 03 3B"),  # the example of section 10
        (0, 0, "02 00 31 03 36"),
        (1, 0, "02 10 31 03 46"),
        (15, 15, "02 FF 31 03 35"),  # 0x02+0xFF+0x31+0x03 = 0x135: the low byte only
        (3, 10, "02 3A 31 03 70"),
    ],
)
def test_encode_unlock(board: int, lock: int, frame: str) -> None:
    assert encode_unlock(board, lock) == bytes.fromhex(frame)


@pytest.mark.parametrize(
    ("board", "frame"),
    [
        (0, "02 00 30 03 35"),  # the example of section 10
        (1, "02 10 30 03 45"),
        (15, "02 F0 30 03 25"),  # 0x125 -> 0x25
    ],
)
def test_encode_status(board: int, frame: str) -> None:
    assert encode_status(board) == bytes.fromhex(frame)


# A reply built by hand from the section's layout: board 2; locks 1 and 9 (bits 0 of L1-8 and
# of L9-16) and lock 16 (bit 7 of L9-16) set; infrared of lock 3 (bit 2 of IR1-8) set.
# 02 20 35 01 81 04 00 03 and SUM = 0x02+0x20+0x35+0x01+0x81+0x04+0x00+0x03 = 0xE0.
HAND_REPLY = bytes.fromhex("02 20 35 01 81 04 00 03 E0")


def test_a_hand_built_reply_decodes_lock_1_in_bit_0() -> None:
    (reply,) = FrameDecoder().feed(HAND_REPLY)
    assert reply == StatusReply(board=2, lock_bits=0x8101, ir_bits=0x0004)
    assert [reply.lock_bit(n) for n in range(16)] == [1, 0, 0, 0, 0, 0, 0, 0,
                                                       1, 0, 0, 0, 0, 0, 0, 1]
    assert [n for n in range(16) if reply.ir_bit(n)] == [2]
    assert encode_reply(reply) == HAND_REPLY


def test_a_reply_to_an_unlock_naming_the_lock_decodes_to_its_board() -> None:
    # Some boards answer an unlock with a status reply whose ADDR carries the lock number.
    reply = StatusReply(board=2, lock_bits=0x8100, ir_bits=0x0004)
    frame = encode_reply(reply, lock=5)
    assert frame[1] == 0x25
    assert FrameDecoder().feed(frame) == [reply]


def test_checksum_is_the_low_byte_of_the_sum() -> None:
    assert checksum(b"") == 0
    assert checksum(bytes.fromhex("02 05 31 03")) == 0x3B
    assert checksum(b"\xff" * 3) == 0xFD


@pytest.mark.parametrize(
    ("call", "args"),
    [
        (encode_unlock, (16, 0)),
        (encode_unlock, (0, 16)),
        (encode_unlock, (-1, 0)),
        (encode_unlock, (0, -1)),
        (encode_unlock, (True, 0)),
        (encode_status, (16,)),
        (encode_status, (-1,)),
        (encode_status, ("0",)),
    ],
)
def test_out_of_range_addresses_are_refused(call: object, args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        call(*args)  # type: ignore[operator]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"board": 16, "lock_bits": 0, "ir_bits": 0},
        {"board": 0, "lock_bits": 0x10000, "ir_bits": 0},
        {"board": 0, "lock_bits": 0, "ir_bits": -1},
    ],
)
def test_a_reply_out_of_range_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        StatusReply(**kwargs)


def test_bad_checksum_is_discarded_and_counted() -> None:
    decoder = FrameDecoder()
    bad = HAND_REPLY[:-1] + bytes([HAND_REPLY[-1] ^ 0x01])
    assert decoder.feed(bad) == []
    assert decoder.bad_checksums == 1
    # The decoder is not stuck: the next good frame comes through.
    assert decoder.feed(HAND_REPLY) == [StatusReply(2, 0x8101, 0x0004)]
    assert decoder.frames == 1


def test_a_frame_split_across_reads_is_reassembled() -> None:
    decoder = FrameDecoder()
    out = [r for byte in HAND_REPLY for r in decoder.feed(bytes([byte]))]
    assert out == [StatusReply(2, 0x8101, 0x0004)]


def test_resync_after_a_false_start_inside_garbage() -> None:
    # An STX in the noise starts a candidate that swallows the start of the real frame; the
    # decoder must slide one byte, not a whole frame, to find it.
    decoder = FrameDecoder()
    assert decoder.feed(b"\x02\x99" + HAND_REPLY) == [StatusReply(2, 0x8101, 0x0004)]
    assert decoder.discarded_bytes == 2


def test_our_own_queries_echoed_by_the_adapter_are_skipped() -> None:
    # Some RS-485 adapters hear their own transmission.
    reply = encode_reply(StatusReply(0, 0xFFFF, 0))
    assert FrameDecoder().feed(encode_status(0) + reply) == [StatusReply(0, 0xFFFF, 0)]


def test_non_bytes_input_does_not_raise() -> None:
    decoder = FrameDecoder()
    assert decoder.feed("not bytes") == []  # type: ignore[arg-type]
    assert decoder.feed(None) == []  # type: ignore[arg-type]
    assert decoder.feed(HAND_REPLY) == [StatusReply(2, 0x8101, 0x0004)]


def test_request_decoder_reads_what_the_host_sends() -> None:
    decoder = RequestDecoder()
    stream = b"\x00" + encode_unlock(0, 5) + b"\x02\xff" + encode_status(7)
    assert decoder.feed(stream) == [Request(0, 5, CMD_UNLOCK), Request(7, 0, CMD_STATUS)]


# -- properties ---------------------------------------------------------------------------------

replies = st.builds(
    StatusReply,
    board=st.integers(0, 15),
    lock_bits=st.integers(0, 0xFFFF),
    ir_bits=st.integers(0, 0xFFFF),
)

# Noise that cannot itself hold a reply header (a reply needs CMD_REPLY two bytes after STX):
# with it between frames, every valid frame must come out. It still holds STX and ETX.
noise_without_header = st.binary(max_size=40).map(lambda b: b.replace(bytes([CMD_REPLY]), b""))


@given(replies)
def test_roundtrip_encode_then_decode(reply: StatusReply) -> None:
    frame = encode_reply(reply)
    assert len(frame) == 9
    assert frame[0] == 0x02 and frame[2] == CMD_REPLY and frame[7] == 0x03
    assert frame[8] == checksum(frame[:8])
    assert FrameDecoder().feed(frame) == [reply]


@given(st.integers(0, 15), st.integers(0, 15))
def test_roundtrip_requests(board: int, lock: int) -> None:
    decoder = RequestDecoder()
    assert decoder.feed(encode_unlock(board, lock)) == [Request(board, lock, CMD_UNLOCK)]
    assert decoder.feed(encode_status(board)) == [Request(board, 0, CMD_STATUS)]


@given(st.lists(st.tuples(noise_without_header, replies), max_size=8), noise_without_header,
       st.lists(st.integers(1, 16), min_size=1, max_size=8))
def test_no_valid_frame_is_lost_in_garbage(
    parts: list[tuple[bytes, StatusReply]], tail: bytes, chunks: list[int]
) -> None:
    stream = b"".join(noise + encode_reply(reply) for noise, reply in parts) + tail
    decoder = FrameDecoder()
    out: list[StatusReply] = []
    # The port hands the bytes over in arbitrary slices.
    pos = i = 0
    while pos < len(stream):
        size = chunks[i % len(chunks)]
        out += decoder.feed(stream[pos:pos + size])
        pos += size
        i += 1
    assert out == [reply for _, reply in parts]


@given(st.lists(st.one_of(st.binary(max_size=64), replies.map(encode_reply)), max_size=12))
def test_any_bytes_never_raise_and_only_checked_frames_come_out(pieces: list[bytes]) -> None:
    decoder = FrameDecoder()
    for piece in pieces:
        for reply in decoder.feed(piece):
            # Whatever comes out is a well-formed reply: it survives the round trip.
            assert FrameDecoder().feed(encode_reply(reply)) == [reply]


@given(st.binary(max_size=512))
def test_random_bytes_never_raise(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    RequestDecoder().feed(data)
    # The buffer never grows past one frame's worth whatever the input.
    assert decoder.buffered < 9


@given(replies, st.integers(0, 8), st.integers(1, 255))
def test_a_corrupted_byte_never_yields_a_wrong_reply(
    reply: StatusReply, index: int, flip: int
) -> None:
    frame = bytearray(encode_reply(reply))
    frame[index] ^= flip
    out = FrameDecoder().feed(bytes(frame))
    # A single corrupted byte is caught by the framing or the checksum.
    assert out == []
