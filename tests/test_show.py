"""`formrules show FORM`: the tree with node paths (issue 12, item 3)."""

from __future__ import annotations

from click.testing import CliRunner

from formrules.cli import cli

PARCEL = """\
form: parcel
title: Send a parcel
fields:
  - {name: sender, type: string, required: true}
  - {name: size, type: choice, choices: [S, L]}
  - {name: ship_on, type: date}
  - {name: sent, type: boolean, hidden: true}
events:
  submit:
    - set: {sent: false}
    - if: record.size == 'L'
      then:
        - log: "Large parcel from {{ record.sender }}"
      else:
        - log: small
    - background:
        title: "Labelling for {{ record.sender }}"
        flag: sent
        timeout: 10m
        retry: {attempts: 3, backoff: [30s, 5m]}
        do:
          - progress: {done: 0, total: 1, message: Printing}
          - send_email: {to: a@example.com, subject: Label, body: Attached.}
        on_error:
          - log: gave up
    - delay:
        title: Pick-up reminder
        at: record.ship_on
        await: false
        retry: false
        cancel_if: record.sent
        do:
          - log: reminder
  update:
    - delay:
        {title: Recheck, for: 1h30m, do: [{log: again}],
         retry: {attempts: 4, backoff: exponential, base: 1m, max: 1h}}
batches:
  relabel: {title: Relabel, concurrency: 3, stop_on_error: true, do: [{log: relabel}]}
schedules:
  - {name: nightly, cron: '0 2 * * *', timezone: Europe/Paris, for_each: "not record.sent",
     do: [{log: late}]}
"""


def test_show_prints_every_node_with_its_path(tmp_path):
    (tmp_path / "parcel.yaml").write_text(PARCEL)
    result = CliRunner().invoke(cli, ["show", "parcel", "--rules", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "form parcel: Send a parcel",
        f"file: {tmp_path}/parcel.yaml",
        "fields: sender (string, required), size (choice: S | L), ship_on (date), "
        "sent (boolean, hidden)",
        "",
        "events/submit",
        "  events/submit/0  set sent",
        "  events/submit/1  if record.size == 'L'",
        "    events/submit/1/then/0  log message",
        "    events/submit/1/else/0  log message",
        "  events/submit/2/background  background 'Labelling for {{ record.sender }}' at once; "
        "awaited; sets sent when done; 3 attempts, waiting 30s, 5m; timeout 10m; "
        "on_error: 1 node(s)",
        "    events/submit/2/background/do/0  progress 0/1 'Printing'",
        "    events/submit/2/background/do/1  send_email to, subject, body",
        "    events/submit/2/background/on_error/0  log message",
        "  events/submit/3/delay  delay 'Pick-up reminder' at record.ship_on (recomputed on "
        "edit); not awaited; no retries; cancel_if: record.sent",
        "    events/submit/3/delay/do/0  log message",
        "",
        "events/update",
        "  events/update/0/delay  delay 'Recheck' after 1h30m; not awaited; 4 attempts, "
        "exponential from 1m up to 1h",
        "    events/update/0/delay/do/0  log message",
        "",
        "batches/relabel  batch 'Relabel': concurrency 3, stop on error; started by "
        "operators; no retries",
        "  batches/relabel/do/0  log message",
        "",
        "schedules/0  schedule 'nightly': cron '0 2 * * *' Europe/Paris; for each record "
        "where not record.sent; catch_up latest",
        "  schedules/0/do/0  log message",
    ]


def test_show_says_when_there_is_no_such_form(tmp_path):
    (tmp_path / "parcel.yaml").write_text(PARCEL)
    result = CliRunner().invoke(cli, ["show", "nope", "--rules", str(tmp_path)],
                                standalone_mode=False)
    assert "no form 'nope'" in str(result.exception)


def test_the_documented_show_output_is_exact(monkeypatch):
    from tests.test_docs import BLOCKS, ROOT
    monkeypatch.chdir(ROOT)
    block = next(b for b in BLOCKS if b.text.startswith("$ formrules show newsletter"))
    result = CliRunner().invoke(cli, ["show", "newsletter", "--rules", "rules"])
    assert result.exit_code == 0, result.output
    assert block.text.splitlines()[1:] == result.output.splitlines()
