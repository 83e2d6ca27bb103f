"""The backend registry: lazy imports by name, and errors that name the config key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hal.base import DeviceKind, LockDriver
from hal.errors import BackendError
from hal.registry import BACKENDS, DEVICE_KINDS, HalContext, build_device, load_backend_class
from lockerd.app import Devices
from lockerd.config import HalSection

pytestmark = pytest.mark.e2e


def test_every_kind_has_a_sim_backend_that_loads() -> None:
    for kind, base in DEVICE_KINDS.items():
        cls = load_backend_class(kind, "sim", config_key=f"[hal.{kind}] backend")
        assert issubclass(cls, base)
    assert set(BACKENDS) == set(DEVICE_KINDS)


def test_device_kinds_are_one_list_that_registry_config_and_daemon_follow() -> None:
    kinds = [str(kind) for kind in DeviceKind]
    assert kinds == ["lock", "door_sensor", "occupancy", "keypad", "scanner", "display",
                     "tamper"]
    assert list(DEVICE_KINDS) == list(BACKENDS) == list(DeviceKind)
    # The config has a [hal.<kind>] table per kind, the daemon a slot per kind, same order.
    assert sorted(HalSection.__struct_fields__) == sorted(kinds)
    assert [f.name for f in dataclasses.fields(Devices)] == kinds
    # A kind is its config table's name: plain strings still find it.
    assert all(DEVICE_KINDS[kind] is DEVICE_KINDS[DeviceKind(kind)] for kind in kinds)


def test_unknown_backend_names_the_key_and_the_known_ones() -> None:
    with pytest.raises(BackendError) as info:
        load_backend_class("lock", "gpoi", config_key="lockerd.toml: [hal.lock] backend")
    assert str(info.value) == (
        "lockerd.toml: [hal.lock] backend: unknown lock backend 'gpoi'; known backends: "
        "gpiod, kerong, rpigpio, sim"
    )


def test_unknown_kind() -> None:
    with pytest.raises(BackendError, match="unknown device kind 'laser'"):
        load_backend_class("laser", "sim", config_key="k")


def test_a_missing_library_is_reported_with_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A backend whose module cannot be imported (as RPi.GPIO off a Raspberry Pi).
    patched = {**BACKENDS, "lock": {**BACKENDS["lock"], "ghost": "no_such_module_xyz:Lock"}}
    monkeypatch.setattr("hal.registry.BACKENDS", patched)
    with pytest.raises(BackendError) as info:
        load_backend_class("lock", "ghost", config_key="[hal.lock] backend")
    assert "[hal.lock] backend: backend 'ghost' needs a library that is not installed" in str(
        info.value)


def test_backends_are_imported_only_when_named() -> None:
    # A fresh interpreter: importing the registry must not import any backend module.
    probe = ("import sys, hal.registry; "
             "print(sorted(m for m in sys.modules if m.startswith('sim')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    probe = ("import sys, hal.registry as r; r.load_backend_class('lock', 'sim', config_key='k');"
             " print('sim.backend' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "True"


def test_shared_resources_and_services(tmp_path: Path) -> None:
    ctx = HalContext(compartments=("1",), state_dir=tmp_path)
    made: list[int] = []

    def maker(n: int) -> Callable[[], object]:
        def make() -> object:
            made.append(n)
            return object()
        return make

    first = ctx.shared("bus", maker(1))
    assert ctx.shared("bus", maker(2)) is first
    assert made == [1]

    async def service() -> None:
        return None

    ctx.add_service("x", service)
    ctx.add_service("x", service)
    assert list(ctx.services) == ["x"]


def test_sim_device_options_are_validated(tmp_path: Path) -> None:
    ctx = HalContext(compartments=("1",), state_dir=tmp_path)
    with pytest.raises(BackendError, match=r"hal\.lock"):
        build_device("lock", "sim", options={"pin": 4}, context=ctx, config_key="[hal.lock]")
    device = build_device("lock", "sim", options={}, context=ctx, config_key="[hal.lock]")
    assert isinstance(device, LockDriver)
