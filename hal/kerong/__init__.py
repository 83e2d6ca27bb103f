"""Kerong CU16 RS-485 lock boards: a pure codec, a serial transport and the bus driver."""

from hal.kerong.codec import (
    FrameDecoder,
    Request,
    RequestDecoder,
    StatusReply,
    checksum,
    encode_reply,
    encode_status,
    encode_unlock,
)

__all__ = [
    "FrameDecoder",
    "Request",
    "RequestDecoder",
    "StatusReply",
    "checksum",
    "encode_reply",
    "encode_status",
    "encode_unlock",
]
