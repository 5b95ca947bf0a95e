"""Views turn what a host printed into typed values without ever failing on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from entrypoints.shapes import DomInfoView, VmView, dump, make_converter


def test_a_hostile_dominfo_is_typed_as_unknown_and_still_valid_json() -> None:
    """5,000 digits would make ``int()`` raise (a 500) and 400 digits of seconds a float ``inf``,
    which JSON cannot carry: both read as unknown, and the text stays beside them."""
    view = DomInfoView.of({"cpus": "1" * 5000, "max_memory": "9" * 5000 + " KiB", "cpu_time": "9" * 400 + "s",
                           "autostart": "disable", "id": None})
    assert (view.cpus, view.max_memory_kib, view.cpu_time_seconds, view.autostart) == (None, None, None, False)
    assert view.text["cpus"] == "1" * 5000
    json.dumps(dump(view), allow_nan=False)


def test_dominfo_as_virsh_prints_it_is_typed() -> None:
    view = DomInfoView.of({"id": 4, "name": "db 2", "state": "running", "cpus": "2", "cpu_time": "12.5s",
                           "max_memory": "2097152 KiB", "used_memory": "1048576 KiB", "persistent": "yes",
                           "autostart": "enable", "managed_save": "no"})
    assert (view.id, view.cpus, view.cpu_time_seconds, view.max_memory_kib, view.used_memory_kib) == \
        (4, 2, 12.5, 2097152, 1048576)
    assert (view.persistent, view.autostart, view.managed_save) == (True, True, False)
    assert view.text["max_memory"] == "2097152 KiB" and view.text["id"] == "4"


@given(st.text(max_size=20), st.sampled_from(["running", "paused", "shut off"]), st.none() | st.integers(1, 10**6),
       st.sampled_from(["live", "host"]), st.none() | st.datetimes(timezones=st.just(UTC)))
def test_a_vm_row_is_written_as_the_generic_converter_writes_it(name: str, state: str, domain_id: int | None,
                                                                 source: str, observed_at: datetime | None) -> None:
    vm = VmView(name, state, domain_id, source, observed_at)
    assert dump(vm) == make_converter().unstructure(vm)  # the fleet view's fast path (issue 22) changes nothing


@given(st.datetimes(timezones=st.timezones()))
def test_a_time_prints_its_own_offset_even_after_an_equal_instant_at_another(value: datetime) -> None:
    # times are formatted once and remembered; equal instants at other offsets are equal datetimes
    converter = make_converter()
    as_utc = value.astimezone(UTC)
    assert converter.unstructure(as_utc) == as_utc.isoformat().replace("+00:00", "Z")
    assert converter.unstructure(value) == value.isoformat().replace("+00:00", "Z")
