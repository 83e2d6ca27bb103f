"""The suite's own settings: unit and e2e markers, strict marker names, warnings as errors."""

from __future__ import annotations

import warnings

import pytest

pytestmark = pytest.mark.unit


def test_unit_and_e2e_are_registered_markers(pytestconfig: pytest.Config) -> None:
    names = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert {"unit", "e2e"} <= names


def test_an_unknown_marker_is_an_error(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.option.strict_markers


def test_a_warning_fails_the_test() -> None:
    with pytest.raises(DeprecationWarning, match="old call"):
        warnings.warn("old call", DeprecationWarning, stacklevel=1)
