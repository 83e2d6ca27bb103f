"""The pure side of deadlines that wait: downtime, out-of-service time, the cap."""

from __future__ import annotations

import pytest

from lockerd.core.deadlines import DeadlineClock, Heartbeat, extension_s

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0


def test_downtime_is_real_time_since_the_last_synchronised_heartbeat() -> None:
    clock = DeadlineClock(Heartbeat(at=T0), mono=5.0)
    assert clock.tick(mono=5.0, wall=T0 + 3600, synced=True, out_of_service=()) == 3600
    # Measured once per start: a running clock that jumps extends nothing.
    assert clock.tick(mono=65.0, wall=T0 + 3660 + 86400, synced=True, out_of_service=()) == 0
    assert clock.heartbeat.at == T0 + 3660 + 86400


def test_a_clock_set_back_shortens_nothing() -> None:
    clock = DeadlineClock(Heartbeat(at=T0), mono=0.0)
    assert clock.tick(mono=0.0, wall=T0 - 7200, synced=True, out_of_service=()) == 0


def test_no_downtime_is_measured_on_a_clock_that_is_not_synchronised() -> None:
    clock = DeadlineClock(Heartbeat(at=T0), mono=0.0)
    # Set a day forward, not synchronised: nothing, and the synchronised mark stays.
    assert clock.tick(mono=0.0, wall=T0 + 86400, synced=False, out_of_service=()) == 0
    assert clock.tick(mono=600.0, wall=T0 + 87000, synced=False, out_of_service=()) == 0
    assert clock.heartbeat.at == T0
    assert clock.heartbeat.run_s == 600
    # Synchronised at last, 1000 s of real time after the start: the time the daemon ran
    # since the mark is not downtime.
    assert clock.tick(mono=1000.0, wall=T0 + 5000, synced=True, out_of_service=()) == 4000


def test_running_time_without_synchronisation_survives_a_restart() -> None:
    first = DeadlineClock(Heartbeat(at=T0), mono=0.0)
    first.tick(mono=300.0, wall=T0 + 999_999, synced=False, out_of_service=())
    stored = Heartbeat.from_json(first.heartbeat.to_json())
    second = DeadlineClock(stored, mono=50.0)
    assert second.tick(mono=150.0, wall=T0 + 1000, synced=True, out_of_service=()) == 600


def test_a_first_start_has_no_downtime() -> None:
    clock = DeadlineClock(Heartbeat(), mono=0.0)
    assert clock.tick(mono=0.0, wall=T0, synced=True, out_of_service=()) == 0
    assert clock.heartbeat.at == T0


def test_out_of_service_time_is_counted_on_the_monotonic_clock() -> None:
    clock = DeadlineClock(Heartbeat(at=T0), mono=0.0)
    clock.tick(mono=0.0, wall=T0, synced=True, out_of_service=())
    clock.out_of_service("2", mono=10.0, out_of_service=())
    clock.tick(mono=60.0, wall=T0 + 60, synced=True, out_of_service=("2",))
    assert clock.heartbeat.out_of_service_s == {"2": 50.0}
    # A wall clock jump in between changes nothing: 100 s of running time out of service.
    clock.tick(mono=100.0, wall=T0 + 999_999, synced=True, out_of_service=("2",))
    assert clock.back_in_service("2", mono=110.0, out_of_service=()) == 100.0
    assert clock.heartbeat.out_of_service_s == {}


def test_a_compartment_back_in_service_while_the_daemon_was_down_is_forgotten() -> None:
    clock = DeadlineClock(Heartbeat(at=T0, out_of_service_s={"3": 500.0}), mono=0.0)
    clock.tick(mono=0.0, wall=T0, synced=True, out_of_service=())
    assert clock.heartbeat.out_of_service_s == {}


def test_the_extension_stays_within_the_cap() -> None:
    assert extension_s(3600.5, already_s=0, cap_s=259200) == 3600
    assert extension_s(100_000, already_s=200_000, cap_s=259200) == 59200
    assert extension_s(100, already_s=259200, cap_s=259200) == 0
    assert extension_s(100, already_s=0, cap_s=0) == 0
    assert extension_s(59, already_s=0, cap_s=259200) == 0  # under a heartbeat: nothing


@pytest.mark.parametrize("raw", [None, "x", [], {"at": "soon", "run_s": 1},
                                 {"at": 1.0}, {"at": 1.0, "run_s": 0, "out_of_service_s": 7}])
def test_an_unreadable_heartbeat_is_no_heartbeat(raw: object) -> None:
    assert Heartbeat.from_json(raw) == Heartbeat()
