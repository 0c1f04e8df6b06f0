"""The form diagram's Mermaid source (issue 12, item 3): exact output for a small tree,
counts on deferred nodes, links, and author text that cannot break out of its label."""

from __future__ import annotations

from formrules.language.diagram import charts, deferred_paths, escape
from formrules.language.loader import parse_form

SMALL = """\
form: small
title: Small
fields:
  - {name: name, type: string}
  - {name: done, type: boolean, hidden: true}
events:
  submit:
    - set: {done: false}
    - if: record.name == 'x'
      then: [{log: "Hello {{ record.name }}"}]
    - background:
        title: Working for {{ record.name }}
        flag: done
        do: [{log: working}]
        on_error: [{set: {done: false}}]
    - delay: {title: Later, for: 1h30m, do: [{log: later}]}
batches:
  again: {title: Again, do: [{log: again}]}
schedules:
  - {name: nightly, cron: '0 2 * * *', do: [{log: late}]}
"""


def small():
    form, problems = parse_form(SMALL, "small.yaml")
    assert problems == []
    return form


def test_a_small_tree_gives_this_exact_source():
    chart = charts(small())[0]
    assert (chart.name, chart.title, chart.path) == ("events/submit", "On submit",
                                                     "events/submit")
    assert chart.source == """\
flowchart TD
  n0["`set done
events/submit/0`"]
  n1{"`if record.name == 'x'
events/submit/1`"}
  n2["`log message
events/submit/1/then/0`"]
  n1 -->|then| n2
  n0 --> n1
  n3[["`background 'Working for #123;#123; record.name #125;#125;'
events/submit/2/background`"]]
  n4["`log message
events/submit/2/background/do/0`"]
  n3 -. later .-> n4
  n5["`set done
events/submit/2/background/on#95;error/0`"]
  n3 -. on error .-> n5
  n1 --> n3
  n6[["`delay 'Later' after 1h30m
events/submit/3/delay`"]]
  n7["`log message
events/submit/3/delay/do/0`"]
  n6 -. later .-> n7
  n3 --> n6
  class n3 deferred
  class n5 failure
  class n6 deferred
  classDef deferred fill:#eef3ff,stroke:#3b5bdb
  classDef dead fill:#fff0f0,stroke:#c92a2a,stroke-width:3px
  classDef failure stroke:#c92a2a,stroke-dasharray:4
"""


def test_counts_and_links_go_on_deferred_nodes_and_dead_ones_stand_out():
    counts = {"events/submit/2/background": {"running": 2, "dead": 1},
              "batches/again": {"waiting": 3}}
    by_name = {c.name: c for c in charts(small(), counts, lambda p: f"/admin?path={p}&a=1")}
    submit = by_name["events/submit"].source.splitlines()
    assert submit[9:12] == [
        "  n3[[\"`background 'Working for #123;#123; record.name #125;#125;'",
        "queued 0, running 2, retrying 0, waiting 0, dead 1",
        "events/submit/2/background`\"]]"]
    assert "  class n3 dead" in submit
    assert '  click n3 href "/admin?path=events/submit/2/background&a=1"' in submit
    assert by_name["batches/again"].source.splitlines()[:5] == [
        "flowchart TD",
        "  %% batch 'Again', 1 at a time",
        "  n0[[\"`batch 'Again'",
        "queued 0, running 0, retrying 0, waiting 3, dead 0",
        "batches/again`\"]]"]
    assert by_name["schedules/0"].title == "Schedule nightly (0 2 * * *)"
    assert deferred_paths(small()) == ["events/submit/2/background", "events/submit/3/delay",
                                       "batches/again", "schedules/0"]


def test_author_text_cannot_close_its_label_or_add_lines():
    hostile = 'x"]\nclick n0 href "javascript:alert(1)"\n%%{init: {}}%% `*b*` <img src=x> #1;'
    text = escape(hostile)
    assert text == ("x#34;#93; click n0 href #34;javascript:alert(1)#34; #37;#37;#123;init: "
                    "#123;#125;#125;#37;#37; #96;#42;b#42;#96; #60;img src=x#62; #35;1#59;")
    assert not set(text) & set('"`\n<>{}[]#*_%') - {"#"}
    assert escape("a" * 100) == "a" * 79 + "#8230;"  # the ellipsis, escaped too


def test_calls_and_tries_show_their_steps():
    form, problems = parse_form("""\
form: flow
fields: [{name: note, type: string}]
trees:
  hello: {do: [{log: hi}]}
events:
  submit:
    - call: {tree: hello}
    - try: [{log: risky}]
      catch: [{log: caught}]
      error_field: note
""", "flow.yaml")
    assert problems == []
    lines = charts(form)[0].source.splitlines()
    assert lines[1:7] == [
        "  n0[/\"`call hello",
        "events/submit/0`\"/]",
        "  n1[\"`log message",
        "events/submit/0/call/0`\"]",
        "  n0 -->|runs| n1",
        "  n2[/\"`try, error in note",
    ]
    assert "  n2 -. on error .-> n4" in lines and "  class n4 failure" in lines
