"""Properties and examples of ``core.virsh``: VM-name rules, argument vectors and their quoting,
the parsers of ``virsh list --all`` and ``virsh dominfo``, and the mapping of virsh failures.

The stderr texts below were measured with the real virsh on this machine (exit status 1)."""

from __future__ import annotations

import shlex
import unicodedata
from collections.abc import Callable, Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core import errors, virsh
from core.errors import Conflict, NotFound, RemoteError, ValidationFailed
from core.model import DEFAULT_LIBVIRT_URI
from core.ports import CommandResult
from core.virsh import VM_NAME_MAX, VmAction, VmSummary
from tests.virsh_tables import display_width, render_table

URIS = st.sampled_from([DEFAULT_LIBVIRT_URI, "qemu:///session", "qemu+ssh://root@hv2/system", "test:///default"])

HOSTILE_NAMES = [
    ";id", "a;id", "$(id)", "`id`", "a`id`b", "--help", "-c", "-", "a|b", "a&b", "a\nb", "a\rb", "a\tb",
    "a'b", 'a"b', "'", '"', "a\x00b", "a/b", "a\\b", "a" * (VM_NAME_MAX + 1), "", " ", " a", "a ",
    "a>b", "a<b", "a*", "a?", "a!", "~a", "#a", "a{b}", "a[b]", "a(b)", "a\u200bb", "a\u2028b", "a\x7fb",
]

SHELL_METACHARACTERS = "$`;&|<>(){}[]*?!~#'\"\\/"
ALLOWED_PUNCTUATION = " ._-+:@,=%"

# Letters and digits of any script: what the rules call "letters and digits".
ALNUM = st.characters(categories=("Lu", "Ll", "Lt", "Lm", "Lo", "Nd"))
NAME_TAIL = st.text(alphabet=st.one_of(ALNUM, st.sampled_from(ALLOWED_PUNCTUATION)), max_size=40)
ACCEPTED_NAMES = st.builds(lambda first, tail: (first + tail).rstrip(" "), ALNUM, NAME_TAIL)
# Text biased towards the characters the rules care about.
NAME_ISH = st.text(alphabet="ab1é中 ._-+:@,=%" + SHELL_METACHARACTERS + "\t\n\x00\x1b\u200b\u00a0", max_size=30)


def hostile_examples(test: Callable[..., None]) -> Callable[..., None]:
    """Run ``test`` on every hostile name (with the default URI) besides what hypothesis draws."""
    for name in HOSTILE_NAMES:
        test = example(name, DEFAULT_LIBVIRT_URI)(test)
    return test


def is_control(char: str) -> bool:
    return unicodedata.category(char) in {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


# ---------------------------------------------------------------------------------------- names and argv


@given(st.one_of(st.text(), NAME_ISH, ACCEPTED_NAMES), URIS)
@hostile_examples
@example("lab-guest1", DEFAULT_LIBVIRT_URI)
@example("lab guest 1", DEFAULT_LIBVIRT_URI)
@example("a" * VM_NAME_MAX, DEFAULT_LIBVIRT_URI)
def test_a_name_is_refused_or_reaches_virsh_as_exactly_the_argument_after_domain(name: str, uri: str) -> None:
    problem = virsh.check_vm_name(name)
    if problem is not None:
        assert isinstance(problem, str) and problem
        for build in [lambda: virsh.dominfo_command(uri, name),
                      *[lambda action=action: virsh.action_command(uri, name, action) for action in VmAction]]:
            with pytest.raises(ValidationFailed) as refused:
                build()
            assert [e.field for e in refused.value.errors] == ["vm"]
        return
    for action in VmAction:
        argv = virsh.action_command(uri, name, action)
        assert argv == ("virsh", "--connect", uri, action.subcommand, "--domain", name)
        assert shlex.split(virsh.command_line(argv)) == list(argv)
    argv = virsh.dominfo_command(uri, name)
    assert argv == ("virsh", "--connect", uri, "dominfo", "--domain", name)
    assert shlex.split(virsh.command_line(argv)) == list(argv)


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_names_are_refused_on_the_vm_field(name: str) -> None:
    assert virsh.check_vm_name(name) is not None
    with pytest.raises(ValidationFailed) as refused:
        virsh.action_command(DEFAULT_LIBVIRT_URI, name, VmAction.START)
    assert [e.field for e in refused.value.errors] == ["vm"]
    with pytest.raises(ValidationFailed) as refused:
        virsh.dominfo_command(DEFAULT_LIBVIRT_URI, name)
    assert [e.field for e in refused.value.errors] == ["vm"]


@given(st.lists(st.text(alphabet=st.characters(exclude_characters="\x00"))))
@example([])
@example([""])
@example(["'", '"', "\\", "$(id)", "`id`", "a b", "\n", "--help", "-c", "~", "*", "é"])
def test_quoting_alone_hands_the_remote_shell_exactly_the_argv(argv: list[str]) -> None:
    assert shlex.split(virsh.command_line(argv)) == argv


@given(st.one_of(st.text(), NAME_ISH))
@example("-x")
@example(" x")
@example("x\u3000")
def test_accepted_names_contain_no_option_start_no_metacharacter_and_no_control(name: str) -> None:
    if virsh.check_vm_name(name) is not None:
        return
    assert 1 <= len(name) <= VM_NAME_MAX
    assert not name.startswith("-")
    assert not name[0].isspace() and not name[-1].isspace()
    assert not any(char in SHELL_METACHARACTERS for char in name)
    assert not any(is_control(char) for char in name)
    assert all(char == " " for char in name if char.isspace())


@pytest.mark.parametrize("char", [*SHELL_METACHARACTERS, "\x00", "\n", "\t", "\x1b", "\x7f", "\u200e"],
                         ids=repr)
def test_every_metacharacter_and_control_is_refused_anywhere_in_a_name(char: str) -> None:
    for name in (f"a{char}b", f"{char}ab", f"ab{char}"):
        assert virsh.check_vm_name(name) is not None, name


def _taken_for_an_id_or_uuid(name: str) -> bool:
    digits = name.replace("-", "")
    return (name.isascii() and name.isdigit()) or (
        len(digits) == 32 and all(c in "0123456789abcdefABCDEF" for c in digits))


@given(ACCEPTED_NAMES.filter(lambda name: len(name) <= VM_NAME_MAX and not _taken_for_an_id_or_uuid(name)))
@example("lab-guest1")
@example("web 01.example.com")
@example("a+b:c@d,e=f%g_h")
@example("ключ 7")
@example("虚拟机-1")
@example("0a")
@example("\u0667")  # a digit, but not one virsh parses as an id
def test_letters_digits_inner_spaces_and_allowed_punctuation_are_accepted(name: str) -> None:
    assert virsh.check_vm_name(name) is None
    assert virsh.require_vm_name(name) == name
    assert virsh.check_snapshot_name(name) is None


@given(st.integers(0) | st.uuids())
@example("0")
@example("4dea22b31d52d8f32516782e98ab3fa0")
@example("4DEA22B3-1D52-D8F3-2516-782E98AB3FA0")
def test_vm_names_virsh_would_take_for_an_id_or_uuid_are_refused(value: object) -> None:
    name = str(value)
    assert virsh.check_vm_name(name) is not None
    assert virsh.check_vm_name(name + "x") is None  # only the exact shapes are refused
    assert virsh.check_snapshot_name(name) is None  # snapshots are only ever looked up by name


def test_names_are_limited_to_200_characters() -> None:
    assert virsh.check_vm_name("a" * VM_NAME_MAX) is None
    assert virsh.check_vm_name("a" * (VM_NAME_MAX + 1)) is not None
    assert virsh.check_vm_name("") is not None


@pytest.mark.parametrize(("action", "subcommand"), [
    (VmAction.START, "start"), (VmAction.SHUTDOWN, "shutdown"),
    (VmAction.FORCE_STOP, "destroy"), (VmAction.REBOOT, "reboot"),
    (VmAction.SUSPEND, "suspend"), (VmAction.RESUME, "resume"),
])
def test_each_action_runs_its_virsh_subcommand(action: VmAction, subcommand: str) -> None:
    assert action.subcommand == subcommand
    assert virsh.action_command("qemu:///system", "vm1", action) == (
        "virsh", "--connect", "qemu:///system", subcommand, "--domain", "vm1")


def test_actions_are_named_as_the_api_names_them() -> None:
    assert [a.value for a in VmAction] == ["start", "shutdown", "force-stop", "reboot", "suspend", "resume"]


def test_list_command_lists_every_vm_of_the_uri() -> None:
    assert virsh.list_command("qemu:///session") == ("virsh", "--connect", "qemu:///session", "list", "--all")


# ---------------------------------------------------------------------------------------- virsh list

REAL_LIST = (" Id   Name         State\n"
             "-----------------------------\n"
             " 1    lab-guest1   running\n"
             " -    lab-guest2   shut off\n"
             "\n")
ENGLISH_STATES = ("running", "idle", "paused", "in shutdown", "shut off", "crashed", "pmsuspended", "blocked",
                  "dying", "no state")
GERMAN_STATES = ("laufend", "ausgeschaltet", "pausiert", "abgestürzt", "im Leerlauf")


def render(rows: Sequence[VmSummary], header: Sequence[str] = ("Id", "Name", "State"),
           extra: Sequence[str] | None = None) -> str:
    """``virsh list --all`` as libvirt's vshTable prints it: every cell after one space, every column
    but the last padded to its widest cell (by display width) plus two spaces, a dashed line of
    sum(width + 3) under the header, and a blank line at the end. ``extra`` adds a last column
    (e.g. --title) whose values are given per row."""
    return render_table(header, [
        [("-" if row.id is None else str(row.id)), row.name, row.state] + ([extra[i]] if extra is not None else [])
        for i, row in enumerate(rows)
    ])


def render_old(rows: Sequence[VmSummary]) -> str:
    """``virsh list --all`` of older libvirt: fixed ``" %-5s %-30s %s"`` columns, 52 dashes."""
    out = f" {'Id':<5} {'Name':<30} State\n" + "-" * 52 + "\n"
    for row in rows:
        out += f" {'-' if row.id is None else row.id!s:<5} {row.name:<30} {row.state}\n"
    return out + "\n"


def short(names: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return names.filter(lambda name: len(name) <= VM_NAME_MAX)


LIST_NAMES = short(st.one_of(
    ACCEPTED_NAMES,
    st.builds(lambda name, state: f"{name} {state}", ACCEPTED_NAMES, st.sampled_from(ENGLISH_STATES)),
    st.builds(lambda state, name: f"{state} {name}", st.sampled_from(ENGLISH_STATES), ACCEPTED_NAMES),
    st.sampled_from(["running", "shut off", "no state", "1", "42 running", "a  b"]),
))
# Rendering and parsing whole tables costs more per example than the other properties.
tables = settings(max_examples=60)
IDS = st.one_of(st.none(), st.integers(min_value=1, max_value=10**7))


def rows_of(states: Sequence[str], names: st.SearchStrategy[str] = LIST_NAMES) -> st.SearchStrategy[list[VmSummary]]:
    return st.lists(st.builds(VmSummary, name=names, state=st.sampled_from(states), id=IDS), max_size=8)


def test_the_renderer_reproduces_real_virsh_output() -> None:
    rows = [VmSummary("lab-guest1", "running", 1), VmSummary("lab-guest2", "shut off", None)]
    assert render(rows) == REAL_LIST


def test_the_real_sample_parses() -> None:
    assert virsh.parse_list(REAL_LIST) == [VmSummary("lab-guest1", "running", 1),
                                           VmSummary("lab-guest2", "shut off", None)]


def test_known_states_are_the_english_states_of_virsh() -> None:
    assert set(ENGLISH_STATES) == set(virsh._KNOWN_STATES)


@tables
@given(rows_of(ENGLISH_STATES))
@example([VmSummary("db running", "shut off", None), VmSummary("x", "running", 12345)])
@example([VmSummary("in", "in shutdown", 3), VmSummary("shut off", "no state", None)])
@example([VmSummary("虚拟机 running", "paused", 7), VmSummary("a", "idle", None)])
def test_parse_list_reads_back_every_rendered_row(rows: list[VmSummary]) -> None:
    assert virsh.parse_list(render(rows)) == rows


@tables
@given(rows_of(ENGLISH_STATES))
@example([VmSummary("a-name-longer-than-thirty-characters-x", "running", 1)])
def test_parse_list_reads_the_older_fixed_width_format(rows: list[VmSummary]) -> None:
    assert virsh.parse_list(render_old(rows)) == rows


@pytest.mark.parametrize("output", [
    "",
    "\n",
    " Id   Name   State\n--------------------\n\n",
    " Id   Name   State\n--------------------\n",
    " Id    Name                           State\n----------------------------------------------------\n\n",
], ids=["empty", "blank", "header", "header-no-blank", "old-header"])
def test_a_list_without_vms_is_empty(output: str) -> None:
    assert virsh.parse_list(output) == []


def test_the_older_format_with_its_longer_dashes_parses() -> None:
    output = (" Id    Name                           State\n"
              "----------------------------------------------------\n"
              " 1     lab-guest1                     running\n"
              " -     lab guest 2                    shut off\n\n")
    assert virsh.parse_list(output) == [VmSummary("lab-guest1", "running", 1),
                                        VmSummary("lab guest 2", "shut off", None)]


def test_a_localized_list_keeps_names_and_the_raw_state() -> None:
    output = (" Id   Name         Status\n"
              "--------------------------------\n"
              " 1    lab-guest1   laufend\n"
              " -    lab guest2   ausgeschaltet\n\n")
    assert virsh.parse_list(output) == [VmSummary("lab-guest1", "laufend", 1),
                                        VmSummary("lab guest2", "ausgeschaltet", None)]


# Narrow characters only (one terminal column each); wide ones have their own tests below.
NARROW_ALNUM = ALNUM.filter(lambda char: display_width(char) == 1)
NARROW_ACCEPTED_NAMES = st.builds(
    lambda first, tail: (first + tail).rstrip(" "),
    NARROW_ALNUM,
    st.text(alphabet=st.one_of(NARROW_ALNUM, st.sampled_from(ALLOWED_PUNCTUATION)), max_size=40),
)
NARROW_NAMES = st.one_of(
    NARROW_ACCEPTED_NAMES,
    st.builds(lambda name, state: f"{name} {state}", NARROW_ACCEPTED_NAMES, st.sampled_from(ENGLISH_STATES)),
    st.sampled_from(["running", "shut off", "no state", "1", "42 running", "a  b"]),
)


@tables
@given(rows_of(GERMAN_STATES, NARROW_NAMES))
def test_parse_list_reads_back_a_localized_list(rows: list[VmSummary]) -> None:
    assert virsh.parse_list(render(rows, header=("Id", "Name", "Status"))) == rows




def test_a_localized_list_with_wide_characters_in_a_name_parses() -> None:
    rows = [VmSummary("虚拟机", "laufend", 1), VmSummary("abcdef", "ausgeschaltet", None)]
    output = render(rows, header=("Id", "Name", "Status"))
    assert output.splitlines()[2] == " 1    虚拟机   laufend"
    assert virsh.parse_list(output) == rows


def test_a_title_column_with_wide_characters_in_a_name_parses() -> None:
    rows = [VmSummary("虚拟机", "running", 1), VmSummary("abcdef", "shut off", None)]
    output = render(rows, header=("Id", "Name", "State", "Title"), extra=["web", ""])
    assert virsh.parse_list(output) == rows


def test_a_title_column_keeps_name_and_state() -> None:
    rows = [VmSummary("lab-guest1", "running", 1), VmSummary("lab guest2", "shut off", None),
            VmSummary("lab-guest3", "paused", 3)]
    output = render(rows, header=("Id", "Name", "State", "Title"), extra=["My title", "", "web server 2"])
    assert output.splitlines()[0] == " Id   Name         State      Title"
    assert virsh.parse_list(output) == rows


def test_a_title_column_of_a_localized_list_keeps_name_and_state() -> None:
    rows = [VmSummary("lab-guest1", "laufend", 1), VmSummary("lab guest2", "ausgeschaltet", None)]
    output = render(rows, header=("Id", "Name", "Status", "Titel"), extra=["Mein Titel", ""])
    assert virsh.parse_list(output) == rows


def _ends_with_a_state(text: str) -> bool:
    return any(text == s or text.endswith(" " + s) for s in ENGLISH_STATES)


TITLES = st.text(alphabet="abcXYZ019 -.", max_size=20).map(str.strip).filter(lambda t: not _ends_with_a_state(t))


@tables
@given(st.data(), rows_of(ENGLISH_STATES, NARROW_NAMES))
def test_parse_list_reads_back_rows_with_a_title_column(data: st.DataObject, rows: list[VmSummary]) -> None:
    titles = data.draw(st.lists(TITLES, min_size=len(rows), max_size=len(rows)))
    assert virsh.parse_list(render(rows, header=("Id", "Name", "State", "Title"), extra=titles)) == rows


def test_a_title_ending_in_a_state_word_keeps_name_and_state() -> None:
    rows = [VmSummary("lab-guest1", "shut off", None)]
    output = render(rows, header=("Id", "Name", "State", "Title"), extra=["always running"])
    assert virsh.parse_list(output) == rows


# ---------------------------------------------------------------------------------------- virsh dominfo

REAL_DOMINFO = """\
Id:             2
Name:           lab-guest1
UUID:           8175cf7c-903d-4947-be34-b63e2b3ccc0f
OS Type:        hvm
State:          running
CPU(s):         1
CPU time:       7.0s
Max memory:     131072 KiB
Used memory:    131072 KiB
Persistent:     yes
Autostart:      disable
Managed save:   no
Security model: none
Security DOI:   0

"""


def test_the_real_dominfo_sample_parses() -> None:
    assert virsh.parse_dominfo(REAL_DOMINFO) == {
        "id": 2,
        "name": "lab-guest1",
        "uuid": "8175cf7c-903d-4947-be34-b63e2b3ccc0f",
        "os_type": "hvm",
        "state": "running",
        "cpus": "1",
        "cpu_time": "7.0s",
        "max_memory": "131072 KiB",
        "used_memory": "131072 KiB",
        "persistent": "yes",
        "autostart": "disable",
        "managed_save": "no",
        "security_model": "none",
        "security_doi": "0",
    }


@pytest.mark.parametrize(("key", "snake"), [
    ("CPU(s)", "cpus"), ("Max memory", "max_memory"), ("OS Type", "os_type"), ("Security DOI", "security_doi"),
    ("Managed save", "managed_save"), ("  Used memory  ", "used_memory"),
])
def test_dominfo_keys_are_snake_cased(key: str, snake: str) -> None:
    assert virsh.parse_dominfo(f"{key}: value") == {snake: "value"}


def test_the_id_of_a_stopped_vm_is_none() -> None:
    info = virsh.parse_dominfo("Id:             -\nName:           lab-guest2\nState:          shut off\n")
    assert info == {"id": None, "name": "lab-guest2", "state": "shut off"}


def test_a_value_containing_colons_is_kept_whole() -> None:
    info = virsh.parse_dominfo("Security label: system_u:system_r:svirt_t:s0:c392,c662 (enforcing)\n"
                               "Name:           a:b\n")
    assert info == {"security_label": "system_u:system_r:svirt_t:s0:c392,c662 (enforcing)", "name": "a:b"}


def test_lines_without_a_key_are_ignored() -> None:
    assert virsh.parse_dominfo("\nno colon here\n: orphan value\nName: x\n") == {"name": "x"}


@given(st.integers(min_value=0, max_value=10**9), st.text(alphabet="abc :-/0", max_size=20))
def test_dominfo_reads_any_numeric_id_and_any_name_value(vm_id: int, value: str) -> None:
    info = virsh.parse_dominfo(f"Id:             {vm_id}\nName:           {value}\n")
    assert info == {"id": vm_id, "name": value.strip()}


# ---------------------------------------------------------------------------------------- failures


def failed(stderr: str, exit_status: int = 1) -> CommandResult:
    return CommandResult(command=("virsh",), exit_status=exit_status, stdout="", stderr=stderr)


NOT_RUNNING = ("error: Failed to {verb} domain 'lab-guest1'\n"
               "error: Requested operation is not valid: domain is not running")
NO_SOCKET = ("error: failed to connect to the hypervisor\n"
             "error: Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory")


@pytest.mark.parametrize(("stderr", "exit_status", "error_class", "code"), [
    ("error: Domain is already active", 1, errors.VmAlreadyRunning, "vm_already_running"),
    ("error: failed to get domain 'nosuch'", 1, errors.VmNotFound, "vm_not_found"),
    (NOT_RUNNING.format(verb="shutdown"), 1, errors.VmNotRunning, "vm_not_running"),
    (NOT_RUNNING.format(verb="destroy"), 1, errors.VmNotRunning, "vm_not_running"),
    (NOT_RUNNING.format(verb="reboot"), 1, errors.VmNotRunning, "vm_not_running"),
    (NO_SOCKET, 1, errors.LibvirtUnavailable, "libvirt_unavailable"),
    ("bash: virsh: command not found", 127, errors.VirshNotFound, "virsh_not_found"),
    ("bash: line 1: virsh: command not found", 127, errors.VirshNotFound, "virsh_not_found"),
], ids=["already-active", "no-such-domain", "shutdown-not-running", "destroy-not-running", "reboot-not-running",
        "no-libvirt", "no-virsh", "no-virsh-line"])
def test_real_virsh_failures_map_to_their_errors(stderr: str, exit_status: int, error_class: type[Exception],
                                                 code: str) -> None:
    with pytest.raises(error_class) as raised:
        virsh.raise_for_failure(failed(stderr, exit_status), "lab-guest1")
    assert type(raised.value) is error_class
    assert raised.value.code == code  # type: ignore[attr-defined]


def test_libvirt_unavailable_keeps_the_stderr() -> None:
    with pytest.raises(RemoteError) as raised:
        virsh.raise_for_failure(failed(NO_SOCKET))
    assert raised.value.code == "libvirt_unavailable"
    assert NO_SOCKET in raised.value.detail


@given(st.text(alphabet="abcdefgh XYZ:'.", min_size=1, max_size=60).map(str.strip).filter(bool),
       st.integers(min_value=1, max_value=255).filter(lambda status: status != 127))
@example("error: internal error: cannot parse XML", 1)
def test_any_other_failure_is_virsh_failed_keeping_the_stderr(stderr: str, exit_status: int) -> None:
    with pytest.raises(RemoteError) as raised:
        virsh.raise_for_failure(failed(stderr, exit_status), "vm1")
    assert type(raised.value) is errors.VirshFailed
    assert raised.value.code == "virsh_failed"
    assert stderr in raised.value.detail


def test_a_failure_with_no_output_is_virsh_failed() -> None:
    with pytest.raises(RemoteError) as raised:
        virsh.raise_for_failure(failed("", 1))
    assert raised.value.code == "virsh_failed"


@given(st.text(), st.text())
@example("", "error: Domain is already active")
def test_exit_status_zero_is_never_an_error(stdout: str, stderr: str) -> None:
    virsh.raise_for_failure(CommandResult(command=("virsh",), exit_status=0, stdout=stdout, stderr=stderr))


@given(short(ACCEPTED_NAMES))
@example("command not found")
@example("already active")
def test_the_vm_name_quoted_in_stderr_does_not_change_the_error(name: str) -> None:
    for stderr, code in [(f"error: failed to get domain '{name}'", "vm_not_found"),
                         (NOT_RUNNING.replace("lab-guest1", name).format(verb="shutdown"), "vm_not_running")]:
        with pytest.raises((NotFound, Conflict, RemoteError)) as raised:
            virsh.raise_for_failure(failed(stderr), name)
        assert raised.value.code == code, stderr  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------- issue 14, item 10


def _spaced_uuid(value: object, separators: list[str]) -> str:
    """A UUID's 16 digit pairs joined by runs of '-' and ' ' (what virUUIDParse skips between pairs)."""
    digits = str(value).replace("-", "")
    pairs = [digits[i:i + 2] for i in range(0, 32, 2)]
    return pairs[0] + "".join(sep + pair for sep, pair in zip(separators, pairs[1:], strict=True))


@given(st.uuids(), st.lists(st.sampled_from(["", " ", "-", "  ", " - ", "--"]), min_size=15, max_size=15))
@example("0123456789abcdef0123456789abcdef", ["", "", "", " ", "", " ", "", " ", "", " ", "", "", "", "", ""])
def test_item10_names_virsh_reads_as_a_uuid_once_spaces_are_skipped_are_refused(
        value: object, separators: list[str]) -> None:
    name = _spaced_uuid(value, separators)
    assert virsh.check_vm_name(name) is not None, name
    with pytest.raises(ValidationFailed):
        virsh.dominfo_command(DEFAULT_LIBVIRT_URI, name)
    assert virsh.check_snapshot_name(name) is None  # snapshots are only ever looked up by name


def test_item10_the_issue_s_example_is_refused() -> None:
    assert virsh.check_vm_name("01234567 89ab cdef 0123 456789abcdef") is not None
    assert virsh.check_vm_name("01234567 89ab cdef 0123 456789abcdeg") is None  # not hexadecimal
