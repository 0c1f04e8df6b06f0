"""Validation errors of the rule language: exact messages, with file:line:col and node path.

Rule authors see these messages before anything runs, so each test pins the whole line.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from formrules.cli import cli
from formrules.errors import RuleError
from formrules.language.loader import check_rules, load_rules, parse_form

ROOT = Path(__file__).resolve().parents[1]

HEAD = """\
form: booking
fields:
  - {name: email, type: email}
  - {name: room, type: choice, choices: [Atlas, Borealis]}
  - {name: date, type: date}
  - {name: status, type: string, hidden: true}
  - {name: confirmed, type: boolean, hidden: true, default: false}
events:
  submit:
"""  # the submit tree's first node is on line 10, its key in column 7


def problems(text: str, file: str = "rules/booking.yaml") -> list[str]:
    """Every problem in one form file, sorted, as `formrules check` prints them."""
    _form, found = parse_form(textwrap.dedent(text), file)
    return [str(p) for p in sorted(found)]


def submit(nodes: str) -> list[str]:
    """Problems of a submit tree (written at column 1) under HEAD's fields."""
    return problems(HEAD + textwrap.indent(textwrap.dedent(nodes), "    "))


def test_example_rules_are_valid():
    assert set(load_rules(ROOT / "rules").forms) == {"contacts_import", "expense_report",
                                                     "newsletter", "room_booking"}


def test_unknown_action_suggests_the_closest_name():
    assert submit("- send_emial: {to: a@example.com, subject: Hi, body: Hello}") == [
        "rules/booking.yaml:10:7: events/submit/0: unknown action 'send_emial' "
        "(did you mean 'send_email'?)"]


def test_unknown_action_without_a_close_name_has_no_suggestion():
    assert submit("- launch_rocket: {}") == [
        "rules/booking.yaml:10:7: events/submit/0: unknown action 'launch_rocket'"]


def test_unknown_field_in_set_and_in_templates():
    assert submit("""\
        - set: {stauts: done}
        - log: "Booked {{ record.rom }}"
        - if: "record.dat > today()"
          then: []
        """) == [
        "rules/booking.yaml:10:13: events/submit/0: unknown field 'stauts' "
        "(did you mean 'status'?)",
        "rules/booking.yaml:11:12: events/submit/1: unknown field 'rom' in template "
        "(did you mean 'room'?)",
        "rules/booking.yaml:12:11: events/submit/2: unknown field 'dat' in expression "
        "(did you mean 'date'?)",
    ]


def test_unknown_name_in_an_expression():
    assert submit("- if: \"recrod.room == 'Atlas'\"\n  then: []\n") == [
        "rules/booking.yaml:10:11: events/submit/0: unknown name 'recrod' in expression "
        "(did you mean 'record'?)"]


def test_flag_must_be_a_boolean_field():
    assert submit("- background: {flag: status, do: [{log: hi}]}") == [
        "rules/booking.yaml:10:26: events/submit/0/background: flag field 'status' must "
        "have type boolean, not string"]


def test_flag_must_be_a_declared_field():
    assert submit("- background: {flag: confirmd, do: [{log: hi}]}") == [
        "rules/booking.yaml:10:26: events/submit/0/background: unknown field 'confirmd' "
        "(did you mean 'confirmed'?)"]


@pytest.mark.parametrize("option, value, col", [
    ("timeout", "5 minutes", 46), ("inline_for", "-3s", 49)])
def test_bad_duration(option, value, col):
    got = submit(f"- background: {{do: [{{log: hi}}], {option}: {value}}}")
    expected = f"expected a duration like 30s, 10m, 2h, 3d or PT10M, got '{value}'"
    assert got == [f"rules/booking.yaml:10:{col}: events/submit/0/background: {expected}"]


def test_bad_duration_in_a_delay_and_a_backoff_list():
    assert submit("""\
        - delay: {for: 2 days, do: [{log: hi}]}
        - background: {do: [{log: hi}], retry: {backoff: [10s, soon]}}
        """) == [
        "rules/booking.yaml:10:20: events/submit/0/delay: expected a duration like 30s, "
        "10m, 2h, 3d or PT10M, got '2 days'",
        "rules/booking.yaml:11:60: events/submit/1/background/retry: expected a duration "
        "like 30s, 10m, 2h, 3d or PT10M, got 'soon'",
    ]


@pytest.mark.parametrize("expression, message", [
    ("record.room ==", "unexpected 'end of expression'"),
    ("record.room = 'Atlas'", "unexpected text after the expression"),
    ("record.room, record.date", "unexpected text after the expression"),
    ("(record.room", "unexpected end of expression, expected ')'."),
    ("", "it is empty"),
])
def test_expression_that_does_not_compile(expression, message):
    assert submit(f'- if: "{expression}"\n  then: []\n') == [
        f"rules/booking.yaml:10:11: events/submit/0: expression does not compile: {message}"]


def test_template_that_does_not_compile():
    assert submit('- log: "Booked {{ record.room "') == [
        "rules/booking.yaml:10:12: events/submit/0: template does not compile: unexpected "
        "end of template, expected 'end of print statement'."]


def test_variables_used_where_they_are_never_set():
    assert submit("""\
        - if: "old.room != record.room"
          then: [{log: "{{ error.message }}"}]
        """) == [
        "rules/booking.yaml:10:11: events/submit/0: 'old' is only set in update events",
        "rules/booking.yaml:11:20: events/submit/0/then/0: 'error' is only set in on_error "
        "branches and try's catch",
    ]


def test_variables_of_update_events_and_error_branches_are_accepted():
    update = textwrap.indent(textwrap.dedent("""\
        update:
          - if: "changed.room and old.room != record.room"
            then:
              - background:
                  do: [{log: "room {{ old.room }} -> {{ record.room }}"}]
                  on_error: [{log: "failed: {{ error.message }}"}]
        """), "  ")
    assert problems(HEAD.replace("  submit:\n", update)) == []


def test_duplicate_keys_are_reported_with_the_first_line():
    assert problems("""\
        form: booking
        title: Book a room
        title: Book a meeting room
        """) == ["rules/booking.yaml:3:1: duplicate key 'title' (first defined at line 2)"]


def test_a_file_that_is_not_yaml():
    assert problems("form: booking\nfields: [\n  - {name: email\n") == [
        "rules/booking.yaml:3:3: not valid YAML: expected a value here, but found a list "
        "item ('-')\n      - {name: email\n      ^"]


def test_a_file_that_is_not_a_mapping():
    assert problems("- form: booking\n") == [
        "rules/booking.yaml:1:1: a rule file must be a mapping with 'form:', 'fields:' and "
        "'events:'"]


def test_a_scalar_yaml_cannot_build_is_a_problem_not_a_crash():
    assert problems("form: booking\nfields:\n  - {name: day, type: date, default: 2024-02-30}\n"
                    ) == ["rules/booking.yaml:3:38: cannot read '2024-02-30': day is out of range "
                          "for month",
                          "rules/booking.yaml:3:38: fields/0: 'default' '2024-02-30' is not a "
                          "valid date value"]


def test_missing_and_malformed_form_id():
    assert problems("title: Book a room\n") == [
        "rules/booking.yaml:1:1: form: a rule file starts with 'form: <id>', like "
        "'form: room_booking'"]
    assert problems("form: Room Booking\n") == [
        "rules/booking.yaml:1:7: form: 'form' must be an id of lowercase letters, digits, "
        "'_' or '-'"]


def test_unknown_top_level_key_and_event():
    assert problems("""\
        form: booking
        feilds: []
        events:
          sumbit: []
        """) == [
        "rules/booking.yaml:2:1: unknown form option 'feilds' (did you mean 'fields'?)",
        "rules/booking.yaml:4:3: events: unknown event 'sumbit' (did you mean 'submit'?)",
    ]


def test_field_mistakes():
    assert problems("""\
        form: booking
        fields:
          - {name: Guests, type: integer}
          - {name: guests, type: integr, min: 1}
          - {name: nights, type: integer, min: one, max_length: 3}
          - {name: name, type: string, min: 2, lable: Your name}
          - {name: room, type: choice, default: Atlas}
          - {name: size, type: choice, choices: [Small, Large], default: Medium}
          - {name: paid, type: boolean, default: "no", required: yes please}
          - {name: day, type: date, default: tomorrow}
          - {name: name, type: text}
        """) == [
        "rules/booking.yaml:3:12: fields/0: a field needs a 'name' of lowercase letters, "
        "digits and '_'",
        "rules/booking.yaml:4:26: fields/1: unknown field type 'integr' (did you mean "
        "'integer'?); expected one of string, text, email, integer, decimal, boolean, date, "
        "datetime, choice, file",
        "rules/booking.yaml:5:40: fields/2: 'min' must be a number",
        "rules/booking.yaml:5:45: fields/2: 'max_length' goes with type: string, text or "
        "email (not integer)",
        "rules/booking.yaml:6:32: fields/3: 'min' goes with type: integer or decimal "
        "(not string)",
        "rules/booking.yaml:6:40: fields/3: unknown field option 'lable' (did you mean "
        "'label'?)",
        "rules/booking.yaml:7:5: fields/4: a choice field needs a non-empty 'choices:' list",
        "rules/booking.yaml:8:66: fields/5: 'default' 'Medium' is not one of the choices",
        "rules/booking.yaml:9:42: fields/6: expected true or false, got str 'no'",
        "rules/booking.yaml:9:58: fields/6: expected true or false, got str 'yes please'",
        "rules/booking.yaml:10:38: fields/7: 'default' 'tomorrow' is not a valid date value",
        "rules/booking.yaml:11:12: fields/8: duplicate field name 'name'",
    ]


def test_node_shape_mistakes():
    assert submit("""\
        - {set: {status: a}, log: b}
        - then: [{log: hi}]
        - if: "record.room == 'Atlas'"
          thne: []
        - just text
        """) == [
        "rules/booking.yaml:10:7: events/submit/0: a node has exactly one key naming its "
        "kind (an action, if, background, delay or progress); got set, log",
        "rules/booking.yaml:11:7: events/submit/1: 'then' belongs beside an 'if:' key",
        "rules/booking.yaml:12:7: events/submit/2: 'if' needs a 'then:' list",
        "rules/booking.yaml:13:7: events/submit/2: unknown if option 'thne' (did you mean "
        "'then'?)",
        "rules/booking.yaml:14:7: events/submit/3: a node must be a mapping like "
        "'- set: {field: value}', got str 'just text'",
    ]


def test_action_argument_mistakes():
    assert submit("""\
        - send_email: {to: "{{ record.email }}", subjet: Hi}
        - simulate_work: {seconds: soon}
        - log:
        """) == [
        "rules/booking.yaml:10:19: events/submit/0: 'send_email' needs 'body'",
        "rules/booking.yaml:10:19: events/submit/0: 'send_email' needs 'subject'",
        "rules/booking.yaml:10:46: events/submit/0: 'send_email' has no option 'subjet' "
        "(did you mean 'subject'?)",
        "rules/booking.yaml:11:32: events/submit/1: 'simulate_work' option 'seconds' expects "
        "number, got str 'soon'",
        "rules/booking.yaml:12:11: events/submit/2: 'log' takes a mapping of message, level; "
        "got nothing",
    ]


def test_deferred_node_mistakes():
    assert submit("""\
        - background: {do: [{log: hi}], await: maybe, when: "record.room"}
        - delay: {do: [{log: hi}]}
        - delay: {for: 1d, at: "record.date", do: [{log: hi}], on_change: always}
        - delay: {for: 1d}
        """) == [
        "rules/booking.yaml:10:44: events/submit/0/background: 'await' must be true, false "
        "or optional, got 'maybe'",
        "rules/booking.yaml:10:51: events/submit/0/background: unknown background option "
        "'when'",
        "rules/booking.yaml:11:7: events/submit/1/delay: a delay needs exactly one of "
        "'for:' or 'at:'",
        "rules/booking.yaml:12:7: events/submit/2/delay: a delay needs exactly one of "
        "'for:' or 'at:'",
        "rules/booking.yaml:12:71: events/submit/2/delay: 'on_change' must be recompute or "
        "keep",
        "rules/booking.yaml:13:7: events/submit/3/delay: 'delay' needs a 'do:' list of nodes",
    ]


def test_retry_mistakes():
    assert submit("""\
        - background: {do: [], retry: {attempts: 0, jitter: 2}}
        - background: {do: [], retry: {backoff: [1m], base: 5s}}
        - background: {do: [], retry: {backoff: fast, tries: 3}}
        - background: {do: [], retry: 3}
        """) == [
        "rules/booking.yaml:10:46: events/submit/0/background/retry: expected a whole "
        "number >= 1, got 0",
        "rules/booking.yaml:10:57: events/submit/0/background/retry: 'jitter' must be a "
        "fraction from 0 to 1",
        "rules/booking.yaml:11:51: events/submit/1/background/retry: 'base' goes with "
        "'backoff: exponential'",
        "rules/booking.yaml:12:45: events/submit/2/background/retry: 'backoff' must be a "
        "list of durations or 'exponential'",
        "rules/booking.yaml:12:51: events/submit/2/background/retry: unknown retry option "
        "'tries'",
        "rules/booking.yaml:13:35: events/submit/3/background/retry: retry must be a "
        "mapping, got int 3",
    ]


def test_batch_and_schedule_mistakes():
    assert problems("""\
        form: booking
        fields:
          - {name: status, type: string}
        batches:
          Export: {do: []}
          archive: {title: Archive}
          remind: {do: [], concurrency: 0, stop_on_error: "yes", retries: 2}
        schedules:
          - {name: nightly, cron: "every night", timezone: Europe/Pariss, do: []}
          - {name: nightly, cron: "0 2 * * *", catch_up: all, do: []}
          - {cron: "0 2 * * *"}
        """) == [
        "rules/booking.yaml:5:3: batches/Export: a batch name is lowercase letters, digits "
        "and '_'",
        "rules/booking.yaml:6:3: batches/archive: a batch needs a 'do:' list of nodes",
        "rules/booking.yaml:7:33: batches/remind: expected a whole number >= 1, got 0",
        "rules/booking.yaml:7:51: batches/remind: expected true or false, got str 'yes'",
        "rules/booking.yaml:7:58: batches/remind: unknown batch option 'retries' (did you mean "
        "'retry'?)",
        "rules/booking.yaml:9:27: schedules/0: 'cron' must be a cron string like "
        "'0 2 * * *', got 'every night'",
        "rules/booking.yaml:9:52: schedules/0: unknown time zone 'Europe/Pariss'",
        "rules/booking.yaml:10:12: schedules/1: duplicate schedule name 'nightly'",
        "rules/booking.yaml:10:50: schedules/1: 'catch_up' must be latest or none",
        "rules/booking.yaml:11:5: schedules/2: a schedule needs a 'do:' list of nodes",
    ]


def test_the_old_tasks_key_still_loads_with_a_warning():
    text = """\
        form: booking
        fields:
          - {name: status, type: string}
        tasks:
          export: {do: [{log: "{{ record.status }}"}], concurrency: 2}
        """
    form, found = parse_form(textwrap.dedent(text), "rules/booking.yaml")
    assert [str(p) for p in found] == [
        "rules/booking.yaml:4:1: warning: tasks: `tasks:` is now `batches:`; rename it"]
    assert [p.severity for p in found] == ["warning"] and not found[0].is_error
    assert form is not None and form.batches["export"].concurrency == 2
    assert form.batches["export"].do[0].path == "batches/export/do/0"
    # Mistakes under the old key are reported as under the new one.
    assert problems(text.replace("concurrency: 2", "concurrency: 0"))[1] == (
        "rules/booking.yaml:5:61: batches/export: expected a whole number >= 1, got 0")


def test_both_batch_keys_in_one_file_is_an_error():
    assert problems("""\
        form: booking
        batches:
          export: {do: []}
        tasks:
          archive: {do: []}
        """) == ["rules/booking.yaml:4:1: tasks: a file has either `batches:` or the old "
                 "`tasks:`, not both; move these into `batches:`"]


def test_a_misspelt_batches_key_is_not_pointed_at_the_old_name():
    assert problems("form: booking\nbatch: {}\n") == [
        "rules/booking.yaml:2:1: unknown form option 'batch' (did you mean 'batches'?)"]


def test_a_directory_with_the_old_key_loads_and_check_says_why(tmp_path):
    (tmp_path / "old.yaml").write_text("form: old\ntasks:\n  export: {do: []}\n")
    ruleset = load_rules(tmp_path)  # a warning does not stop a file from loading
    assert list(ruleset.form("old").batches) == ["export"]


BROKEN = {
    "b_expenses.yaml": """\
        form: expenses
        fields:
          - {name: amount, type: decimal}
        events:
          submit:
            - if: "record.amount >"
              then: [{set: {amount: 0}}]
        """,
    "a_booking.yaml": """\
        form: booking
        fields:
          - {name: email, type: email}
        events:
          submit:
            - send_emial: {to: "{{ record.email }}", subject: Hi, body: Hello}
            - set: {emial: x}
        """,
    "c_dup.yaml": "form: booking\n",
}


def write_broken(folder: Path) -> Path:
    """A rules folder with mistakes in several files (and one duplicate form id)."""
    folder.mkdir()
    for name, text in BROKEN.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def expected_broken(folder: Path) -> list[str]:
    return [
        f"{folder}/a_booking.yaml:6:7: events/submit/0: unknown action 'send_emial' "
        "(did you mean 'send_email'?)",
        f"{folder}/a_booking.yaml:7:13: events/submit/1: unknown field 'emial' "
        "(did you mean 'email'?)",
        f"{folder}/b_expenses.yaml:6:11: events/submit/0: expression does not compile: "
        "unexpected 'end of expression'",
        f"{folder}/c_dup.yaml:1:1: form: form id 'booking' is also used by "
        f"{folder}/a_booking.yaml",
    ]


def test_every_mistake_in_every_file_is_reported_sorted(tmp_path):
    folder = write_broken(tmp_path / "rules")
    _ruleset, found = check_rules(folder)
    assert [str(p) for p in found] == expected_broken(folder)
    with pytest.raises(RuleError) as caught:
        load_rules(folder)
    assert str(caught.value).splitlines() == ["4 problems in the rules:",
                                              *expected_broken(folder)]


def test_formrules_check_prints_every_problem_and_fails(tmp_path):
    folder = write_broken(tmp_path / "rules")
    env = {"FORMRULES_INSTANCE": str(tmp_path / "instance"), "SECRET_KEY": "test",
           "FORMRULES_ACTIONS": ""}
    result = CliRunner().invoke(cli, ["check", str(folder)], env=env)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == expected_broken(folder)
    assert "4 problems found." in result.stderr


def test_formrules_check_accepts_the_example_rules(tmp_path):
    env = {"FORMRULES_INSTANCE": str(tmp_path / "instance"), "SECRET_KEY": "test",
           "FORMRULES_ACTIONS": ""}
    result = CliRunner().invoke(cli, ["check", str(ROOT / "rules")], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("4 form(s) OK in ")


def test_an_unknown_field_type_is_reported_once():
    """Options checked against the type (flag, choices, min, default) wait for a real type."""
    assert problems("""\
        form: booking
        fields:
          - {name: confirmed, type: bool, default: false}
          - {name: size, type: chioce, choices: [S, M], min: 1}
        events:
          submit:
            - background: {flag: confirmed, do: [{log: hi}]}
        """) == [
        "rules/booking.yaml:3:29: fields/0: unknown field type 'bool' (did you mean "
        "'boolean'?); expected one of string, text, email, integer, decimal, boolean, date, "
        "datetime, choice, file",
        "rules/booking.yaml:4:24: fields/1: unknown field type 'chioce' (did you mean "
        "'choice'?); expected one of string, text, email, integer, decimal, boolean, date, "
        "datetime, choice, file",
    ]


def test_cancel_if_may_use_the_edit_variables_anywhere():
    assert submit("""\
        - delay:
            at: "record.date - days(1)"
            cancel_if: "'room' in changed or old.room != record.room"
            when: "old.room"
            do: [{log: reminder}]
        """) == [
        "rules/booking.yaml:13:15: events/submit/0/delay: 'old' is only set in update events"]


def test_field_names_that_shadow_record_builtins_are_refused():
    assert problems("form: booking\nfields:\n  - {name: items, type: integer}\n") == [
        "rules/booking.yaml:3:12: fields/0: field name 'items' is reserved (it names a "
        "built-in of records); choose another name"]
    assert problems("form: booking\nfields:\n  - {name: callback_url, type: string}\n") == [
        "rules/booking.yaml:3:12: fields/0: field name 'callback_url' is reserved by the API "
        "(it registers a completion callback); choose another name"]


def test_a_misplaced_option_is_reported_and_the_node_is_still_checked():
    assert submit("""\
        - background:
            title: Booking
            do:
              - send_emial: {to: a@example.com}
              - set: {stauts: done}
          on_error:
            - log: "{{ record.romm }}"
            - send_email: {to: a@example.com, body: x}
          retry: {attempts: 2}
        - set: {status: ok}
        - {set: {stat: a}, lgo: b}
        """) == [
        "rules/booking.yaml:13:13: events/submit/0/background/do/0: unknown action "
        "'send_emial' (did you mean 'send_email'?)",
        "rules/booking.yaml:14:19: events/submit/0/background/do/1: unknown field 'stauts' "
        "(did you mean 'status'?)",
        "rules/booking.yaml:15:7: events/submit/0: 'on_error' is an option of 'background:' "
        "but is written beside it: indent it under 'background:', level with its 'do:'",
        "rules/booking.yaml:16:16: events/submit/0/background/on_error/0: unknown field "
        "'romm' in template (did you mean 'room'?)",
        "rules/booking.yaml:17:23: events/submit/0/background/on_error/1: 'send_email' "
        "needs 'subject'",
        "rules/booking.yaml:18:7: events/submit/0: 'retry' is an option of 'background:' but "
        "is written beside it: indent it under 'background:', level with its 'do:'",
        "rules/booking.yaml:20:7: events/submit/2: a node has exactly one key naming its kind "
        "(an action, if, background, delay or progress); got set, lgo",
        "rules/booking.yaml:20:14: events/submit/2: unknown field 'stat' (did you mean "
        "'status'?)",
        "rules/booking.yaml:20:24: events/submit/2: unknown action 'lgo' (did you mean "
        "'log'?)",
    ]


def test_a_yaml_syntax_error_is_said_in_plain_words_with_the_line_and_a_caret():
    assert problems("""\
        form: booking
        events:
          submit:
            - background:
                do: []
              on_error: []
           retry: 2
        """) == [
        "rules/booking.yaml:7:4: not valid YAML: this line is not indented like the lines of "
        "the mapping it belongs to (which starts at line 3, column 3); check the indentation: "
        "items of one mapping or list start in the same column\n"
        "       retry: 2\n"
        "       ^"]
    found = problems("fields:\n  - name: a\n  type: string\n")
    assert "'?'" not in found[0] and "<block end>" not in found[0]
    assert found[0].startswith("rules/booking.yaml:3:3: not valid YAML: this line is not "
                               "indented like the lines of the list")
    assert found[0].endswith("\n      type: string\n      ^")


def test_started_by_is_checked_with_positions():
    assert problems("""\
        form: booking
        batches:
          a: {do: [], started_by: [users, operator]}
          b: {do: [], started_by: everyone}
          c: {do: [], started_by: []}
        """) == [
        "rules/booking.yaml:3:35: batches/a: unknown starter 'operator' in 'started_by' "
        "(did you mean 'operators'?); expected operators or users",
        "rules/booking.yaml:4:27: batches/b: unknown starter 'everyone' in 'started_by'; "
        "expected operators or users",
        "rules/booking.yaml:5:27: batches/c: 'started_by' must be operators, users or a "
        "list of them, got []",
    ]
    form, found = parse_form("form: f\nbatches:\n  a: {do: [], started_by: users}\n"
                             "  b: {do: []}\n", "f.yaml")
    assert not found
    assert form.batches["a"].started_by == ("users",)
    assert form.batches["b"].started_by == ("operators",)
