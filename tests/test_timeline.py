"""`formrules preview --until/--at`: time travel on a simulated clock (issue 12, item 4)."""

from __future__ import annotations

from click.testing import CliRunner

from formrules.cli import cli

SHIPPING = """\
form: shipping
fields:
  - {name: who, type: string}
  - {name: ship_on, type: date}
  - {name: express, type: boolean, default: false}
events:
  submit:
    - if: record.express
      then:
        - background:
            title: "Courier for {{ record.who }}"
            retry: {attempts: 3, backoff: [1m, 1h]}
            do:
              - delay: {title: Courier follow-up, for: 2h, retry: false, do: [{log: hi}]}
            on_error: [{log: no courier}]
    - delay:
        title: Ship day
        at: record.ship_on
        retry: {attempts: 3, backoff: exponential, base: 30s, max: 1m, jitter: 0}
        cancel_if: record.express
        do: [{log: ship}]
    - delay: {title: Three days on, at: "today() + days(3)", retry: false, do: [{log: later}]}
schedules:
  - {name: nightly, cron: '0 2 * * *', timezone: Europe/Paris, do: [{log: nightly}]}
  - {name: half_hourly, cron: '*/30 * * * *', retry: false, do: [{log: tick}]}
"""


def run(tmp_path, *args: str) -> list[str]:
    (tmp_path / "shipping.yaml").write_text(SHIPPING)
    result = CliRunner().invoke(cli, ["preview", "shipping", "--rules", str(tmp_path), *args],
                                env={"FORMRULES_TIMEZONE": "UTC"})
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_until_lays_out_delays_retries_and_schedule_slots(tmp_path):
    lines = run(tmp_path, "--set", "who=Ann", "--set", "ship_on=2030-01-03",
                "--set", "express=true", "--at", "2030-01-01T22:00:00+00:00", "--until", "2d")
    timeline = lines[lines.index("") + 1:]
    assert timeline == [
        "shipping: submit at 2030-01-01 22:00:00 UTC, until 2030-01-03 22:00:00 UTC (2d); "
        "nothing is done",
        "2030-01-01 22:00:00 UTC (+0s)  events/submit: submit (the tree's inline steps run)",
        "2030-01-01 22:00:00 UTC (+0s)  events/submit/0/then/0/background: background "
        "'Courier for Ann' runs, attempt 1 of 3",
        "2030-01-01 22:00:00 UTC (+0s)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-01 22:01:00 UTC (+1m)  events/submit/0/then/0/background: if it keeps "
        "failing: attempt 2 of 3, 1m (±10%) after the last",
        "2030-01-01 22:30:00 UTC (+30m)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-01 23:00:00 UTC (+1h)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-01 23:01:00 UTC (+1h1m)  events/submit/0/then/0/background: if it keeps "
        "failing: attempt 3 of 3, 1h (±10%) after the last",
        "2030-01-01 23:01:00 UTC (+1h1m)  events/submit/0/then/0/background: if attempt 3 "
        "fails too: on_error runs (1 node(s)) and the Run is dead",
        "2030-01-01 23:30:00 UTC (+1h30m)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-02 00:00:00 UTC (+2h)  events/submit/0/then/0/background/do/0/delay: delay "
        "'Courier follow-up' runs (no retries)",
        "2030-01-02 00:00:00 UTC (+2h)  events/submit/0/then/0/background/do/0/delay: "
        "if it fails: the Run is dead",
        "2030-01-02 00:00:00 UTC (+2h)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-02 00:30:00 UTC (+2h30m)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-02 01:00:00 UTC (+3h)  schedules/0: schedule 'nightly' fires "
        "(02:00 Europe/Paris)",
        "2030-01-02 01:00:00 UTC (+3h)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-02 01:30:00 UTC (+3h30m)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-02 02:00:00 UTC (+4h)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-02 02:30:00 UTC (+4h30m)  schedules/1: schedule 'half_hourly' fires",
        "2030-01-02 02:30:00 UTC (+4h30m)  schedules/1: … and 87 more slot(s) of "
        "'half_hourly' in the window",
        "2030-01-03 00:00:00 UTC (+1d2h)  events/submit/1/delay: delay 'Ship day' runs, "
        "attempt 1 of 3; cancelled if record.express",
        "2030-01-03 00:00:30 UTC (+1d2h30s)  events/submit/1/delay: if it keeps failing: "
        "attempt 2 of 3, 30s after the last",
        "2030-01-03 00:01:30 UTC (+1d2h1m30s)  events/submit/1/delay: if it keeps failing: "
        "attempt 3 of 3, 1m after the last",
        "2030-01-03 00:01:30 UTC (+1d2h1m30s)  events/submit/1/delay: if attempt 3 fails "
        "too: the Run is dead",
        "2030-01-03 01:00:00 UTC (+1d3h)  schedules/0: schedule 'nightly' fires "
        "(02:00 Europe/Paris)",
        "… 2 more after 2030-01-03 22:00:00 UTC, the next at 2030-01-04 00:00:00 UTC: "
        "events/submit/2/delay",
    ]


def test_at_previews_as_if_submitted_then(tmp_path):
    lines = run(tmp_path, "--set", "ship_on=2030-06-01", "--at", "2030-05-30T12:00")
    assert lines == [
        "events/submit/0: if record.express -> false: else (0 node(s))",
        "events/submit/1/delay: delay 'Ship day' runs at 2030-06-01 00:00:00 UTC (in 1d12h) "
        "on a worker; not awaited; 3 attempts, exponential from 30s up to 1m; "
        "cancel_if: record.express",
        "  events/submit/1/delay/do/0: would run log {'message': 'ship'}",
        "events/submit/2/delay: delay 'Three days on' runs at 2030-06-02 00:00:00 UTC "
        "(in 2d12h) on a worker; not awaited; no retries",
        "  events/submit/2/delay/do/0: would run log {'message': 'later'}",
    ]


def test_bad_until_and_at_are_clear_errors(tmp_path):
    (tmp_path / "shipping.yaml").write_text(SHIPPING)
    for args, message in ((["--until", "soon"], "--until: expected a duration"),
                          (["--at", "tomorrow"], "--at 'tomorrow': expected a time")):
        result = CliRunner().invoke(cli, ["preview", "shipping", "--rules", str(tmp_path),
                                          *args], standalone_mode=False)
        assert message in str(result.exception)


def test_the_documented_timeline_is_exact(monkeypatch):
    from tests.test_docs import BLOCKS, ROOT
    monkeypatch.chdir(ROOT)
    block = next(b for b in BLOCKS if b.text.startswith("$ formrules preview newsletter"))
    command = block.text.splitlines()[0].split()[2:]
    result = CliRunner().invoke(cli, [*command, "--rules", "rules"],
                                env={"FORMRULES_TIMEZONE": "UTC"})
    assert result.exit_code == 0, result.output
    assert block.text.splitlines()[1:] == result.output.splitlines()
