"""The pipe between the daemon and its apply process: request frames in, JSON lines out."""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

# A request: the lengths of its JSON header and of its body, then both.
_LENGTHS = struct.Struct(">IQ")
MAX_HEADER_BYTES = 16 << 20


class FrameError(Exception):
    """The other end sent something that is not a frame (or went away mid-frame)."""


def encode_request(header: dict[str, Any],
                   body: bytes | bytearray = b"") -> tuple[bytes, bytes | bytearray]:
    """The frame's head (lengths and JSON header) and its body, to be written in turn."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return _LENGTHS.pack(len(head), len(body)) + head, body


def read_request(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """The next request, or None at the end of the stream (the daemon closed the pipe)."""
    lengths = stream.read(_LENGTHS.size)
    if not lengths:
        return None
    if len(lengths) != _LENGTHS.size:
        raise FrameError("the request stream ended inside a frame's lengths")
    head_len, body_len = _LENGTHS.unpack(lengths)
    if head_len > MAX_HEADER_BYTES:
        raise FrameError(f"a request header of {head_len} bytes")
    head = stream.read(head_len)
    body = stream.read(body_len) if body_len else b""
    if len(head) != head_len or len(body) != body_len:
        raise FrameError("the request stream ended inside a frame")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise FrameError("a request header that is not a JSON object")
    return header, body


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode("utf-8") + b"\n"
