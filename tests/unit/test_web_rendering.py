"""How the web console's templates treat names they did not choose (any Unicode: agents, VMs,
snapshots, hostile hosts): always as text in HTML, as one path segment in URLs, as one word in a
shell command to copy."""

from __future__ import annotations

import shlex
from urllib.parse import unquote

import markupsafe
from hypothesis import given
from hypothesis import strategies as st

from entrypoints.web.pages import segment, templates

NAMES = st.text(min_size=1, max_size=60)


@given(NAMES)
def test_a_name_is_one_path_segment_that_decodes_back_to_itself(name: str) -> None:
    encoded = segment(name)
    assert not set("/?#% <>\"'") & set(encoded.replace("%", ""))
    assert unquote(encoded, errors="surrogatepass") == name


@given(NAMES, NAMES)
def test_fleet_rows_show_agent_and_vm_names_as_text(agent_name: str, vm_name: str) -> None:
    html = templates().get_template("fleet_rows.html").render(
        entries=[{"agent_id": 1, "agent_name": agent_name, "error": None,
                  "vms": [{"name": vm_name, "state": "running", "id": 3}]}],
        chosen_states=[])
    for name in (agent_name, vm_name):
        assert str(markupsafe.escape(name)) in html
    assert "<img" not in html.replace(str(markupsafe.escape(agent_name)), "").replace(
        str(markupsafe.escape(vm_name)), "")


@given(NAMES)
def test_the_enrollment_command_passes_a_name_to_the_shell_as_one_word(name: str) -> None:
    quoted = templates().from_string("{{ name|shell }}").render(name=name)
    assert shlex.split(str(markupsafe.Markup(quoted).unescape())) == [name]
