"""JSON from outside the bank: decoding that fails with one error type, whatever the input."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

# Both decoders guard their recursion in C against the interpreter's recursion limit (about a
# thousand levels, fewer the deeper the caller's stack), so a deep document costs little memory
# but raises RecursionError, which is neither a msgspec error nor a ValueError. No depth scan
# runs before decoding: one written in Python costs more than decoding a 16 MiB snapshot.
_TOO_DEEP = "nested too deeply (no document of this protocol is more than a few levels deep)"


class JsonInputError(ValueError):
    """The bytes are not JSON, or are nested too deeply to be read; the message says which."""


class JsonShapeError(JsonInputError):
    """The bytes are JSON but not of the expected shape (a field missing or mistyped)."""


def decode(raw: bytes | str, *, type: type[T]) -> T:
    """`msgspec.json.decode(raw, type=type)`; any failure raises JsonInputError."""
    try:
        return msgspec.json.decode(raw, type=type)
    except msgspec.ValidationError as exc:
        raise JsonShapeError(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise JsonInputError(f"not valid UTF-8 JSON ({exc})") from exc
    except RecursionError as exc:
        raise JsonInputError(_TOO_DEEP) from exc


def loads(raw: bytes | str) -> Any:
    """`json.loads(raw)` for a quick look at an untyped document; JsonInputError on failure."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise JsonInputError(_TOO_DEEP) from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise JsonInputError(f"not valid JSON ({exc})") from exc
