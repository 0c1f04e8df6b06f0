"""`formrules impact` (issue 12, item 5): what an edit of the rules changes for pending
work. The comparison is pure (exact output); the command reads real Runs, made by the
real submit service, from a real database."""

from __future__ import annotations

from click.testing import CliRunner
from sqlalchemy import select

from formrules.cli import cli
from formrules.language.impact import PendingRun, compare, lines
from formrules.language.loader import parse_form, rebuild_defer
from formrules.language.tree import DeferNode, walk
from formrules.runs import submit
from formrules.store.models import Run

OLD = """\
form: shop
title: Shop
fields:
  - {name: name, type: string}
  - {name: note, type: string}
  - {name: packed, type: boolean, hidden: true}
events:
  submit:
    - background:
        title: Packing
        flag: packed
        do: [{log: "packing for {{ record.name }}"}]
    - delay:
        title: Follow-up
        for: 1d
        do: [{send_email: {to: a@example.com, subject: "About {{ record.note }}", body: Hi}}]
schedules:
  - {name: nightly, cron: '0 2 * * *', do: [{log: late}]}
  - {name: hourly, cron: '0 * * * *', do: [{log: tick}]}
"""

NEW = """\
form: shop
title: Shop
fields:
  - {name: name, type: string}
  - {name: packed, type: boolean, hidden: true}
events:
  submit:
    - set: {packed: false}
    - background:
        title: Packing
        flag: packed
        do: [{log: "packing for {{ record.name }}"}, {log: labelled}]
schedules:
  - {name: nightly, cron: '0 3 * * *', do: [{log: late}]}
  - {name: weekly, cron: '0 9 * * 1', do: [{log: week}]}
"""

SAME = """\
form: same
title: Same
fields: [{name: name, type: string}]
events:
  submit:
    - background: {title: Quiet, do: [{log: quiet}]}
"""

IMPACT = [
    "  moved: events/submit/0/background -> events/submit/1/background  "
    "(background 'Packing')",
    "  removed but used by 1 pending Run(s): action send_email at "
    "events/submit/1/delay/do/0  [{r2}]",
    "  removed but used by 1 pending Run(s): field note  [{r2}]",
]
SCHEDULES = [
    "  schedule hourly: removed (was cron '0 * * * *' UTC)",
    "  schedule nightly: cron '0 2 * * *' -> '0 3 * * *'",
    "  schedule weekly: added (cron '0 9 * * 1' UTC)",
]


def form(text: str, name: str = "shop.yaml"):
    parsed, problems = parse_form(text, name)
    assert problems == [], problems
    return parsed


def pending(form_, path: str, run_id: str, status: str) -> PendingRun:
    node = next(n for nodes in form_.events.values() for n in walk(nodes)
                if isinstance(n, DeferNode) and n.path == path)
    return PendingRun(run_id, form_.id, path, status, node.raw, form_.field_types)


def test_the_comparison_lists_kept_trees_moves_removed_things_in_use_and_schedules():
    old, new, same = form(OLD), form(NEW), form(SAME, "same.yaml")
    runs = [pending(old, "events/submit/1/delay", "r2", "scheduled"),
            pending(old, "events/submit/0/background", "r1", "queued"),
            pending(same, "events/submit/0/background", "r3", "queued")]
    report = lines(compare({"shop": old, "same": same}, {"shop": new, "same": same}, runs))
    assert report == [
        "form shop: changed",
        "  pending Runs keeping their old tree: 2",
        "    r1  events/submit/0/background  (queued)",
        "    r2  events/submit/1/delay  (scheduled)",
        *[line.format(r2="r2") for line in IMPACT],
        *SCHEDULES,
    ]


def test_nothing_to_say_says_so():
    same = form(SAME, "same.yaml")
    runs = [pending(same, "events/submit/0/background", "r3", "running")]
    assert lines(compare({"same": same}, {"same": same}, runs)) == [
        "No impact: the rules on disk are the rules in use, and no pending Run started "
        "on another tree."]


def test_a_removed_form_lists_its_pending_runs():
    old = form(OLD)
    runs = [pending(old, "events/submit/0/background", "r1", "retrying")]
    assert lines(compare({"shop": old}, {}, runs))[:4] == [
        "form shop: removed",
        "  pending Runs keeping their old tree: 1",
        "    r1  events/submit/0/background  (retrying)",
        "  removed but used by 1 pending Run(s): action log at "
        "events/submit/0/background/do/0  [r1]",
    ]


def test_a_pending_run_whose_node_moved_is_matched_by_title_without_the_old_form():
    """With the default directory the version in use is the one on disk (live reload):
    only the Runs' own snapshots know the old tree."""
    old, new = form(OLD), form(NEW)
    run = pending(old, "events/submit/0/background", "r1", "queued")
    assert rebuild_defer(run.raw, run.path, run.fields).title == "Packing"
    assert lines(compare({"shop": new}, {"shop": new}, [run])) == [
        "form shop: in use as on disk",
        "  pending Runs keeping their old tree: 1",
        "    r1  events/submit/0/background  (queued)",
        "  moved: events/submit/0/background -> events/submit/1/background  "
        "(background 'Packing')",
    ]


def copy_of(rules_dir, tmp_path):
    """A second folder holding the same rule files (to edit one of them)."""
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in rules_dir.glob("*.yaml"):
        (edited / path.name).write_text(path.read_text())
    return edited


def test_the_command_compares_a_folder_with_the_rules_in_use_and_the_runs(
        rt, rules_dir, tmp_path, subprocess_env):
    (rules_dir / "shop.yaml").write_text(OLD)
    shop = form(OLD, str(rules_dir / "shop.yaml"))
    with rt.store.sessions() as s:
        submit.accept(s, shop, {"name": "Ann", "note": "boots"}, owner="anon:a",
                      settings=rt.settings)
    with rt.store.session() as s:
        ids = dict(s.execute(select(Run.node_path, Run.id).where(Run.form_id == "shop")).all())
    edited = copy_of(rules_dir, tmp_path)
    (edited / "shop.yaml").write_text(NEW)
    result = CliRunner().invoke(cli, ["impact", str(edited)], env=subprocess_env)
    assert result.exit_code == 0, result.output
    background, delay = ids["events/submit/0/background"], ids["events/submit/1/delay"]
    assert result.output.splitlines() == [
        "form shop: changed",
        "  pending Runs keeping their old tree: 2",
        *sorted([f"    {background}  events/submit/0/background  (queued)",
                 f"    {delay}  events/submit/1/delay  (scheduled)"],
                key=lambda line: line.split()[1]),
        *[line.format(r2=delay) for line in IMPACT],
        *SCHEDULES,
    ]


def test_a_broken_file_is_not_applied_and_keeps_the_version_in_use(
        rt, rules_dir, tmp_path, subprocess_env):
    (rules_dir / "shop.yaml").write_text(OLD)
    edited = copy_of(rules_dir, tmp_path)
    (edited / "shop.yaml").write_text(OLD.replace("title: Packing", "titel: Packing"))
    result = CliRunner().invoke(cli, ["impact", str(edited)], env=subprocess_env)
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert out[0].startswith("No impact")
    assert out[1:] == [f"not applied: {edited}/shop.yaml:10:9: events/submit/0/background: "
                       "unknown background option 'titel' (did you mean 'title'?)"]


def test_without_a_folder_the_applied_edit_leaves_the_runs_on_their_old_tree(
        rt, rules_dir, subprocess_env):
    """Live reload has applied the edit: the rules in use are those on disk, and only
    the pending Runs' own trees tell what they will still do."""
    shop = form(OLD, str(rules_dir / "shop.yaml"))
    with rt.store.sessions() as s:
        submit.accept(s, shop, {"name": "Ann", "note": "boots"}, owner="anon:a",
                      settings=rt.settings)
    with rt.store.session() as s:
        ids = dict(s.execute(select(Run.node_path, Run.id).where(Run.form_id == "shop")).all())
    (rules_dir / "shop.yaml").write_text(NEW)
    result = CliRunner().invoke(cli, ["impact"], env=subprocess_env)
    assert result.exit_code == 0, result.output
    background, delay = ids["events/submit/0/background"], ids["events/submit/1/delay"]
    assert result.output.splitlines() == [
        "form shop: in use as on disk",
        "  pending Runs keeping their old tree: 2",
        f"    {background}  events/submit/0/background  (queued)",
        f"    {delay}  events/submit/1/delay  (scheduled)",
        *[line.format(r2=delay) for line in IMPACT],
    ]


CALLER = """\
form: caller
title: Caller
fields: [{name: name, type: string}]
trees:
  greet:
    inputs: {who: {type: string}}
    do: [{send_email: {to: a@example.com, subject: "Hi {{ inputs.who }}", body: Hi}}]
events:
  submit:
    - background:
        title: Greeting
        do: [{call: {tree: greet, with: {who: "{{ record.name }}"}}}]
"""


def test_a_run_that_calls_a_named_tree_is_analysed_with_the_tree_it_carries():
    """A pending Run's snapshot carries the named trees it calls: an edit of the tree
    alone keeps it on its old tree, and an action removed from the tree is still used."""
    old = form(CALLER, "caller.yaml")
    new = form(CALLER.replace("send_email: {to: a@example.com, subject: \"Hi {{ inputs.who }}\","
                              " body: Hi}", "log: \"hi {{ inputs.who }}\""), "caller.yaml")
    node = next(n for n in walk(old.events["submit"]) if isinstance(n, DeferNode))
    run = PendingRun("r1", "caller", node.path, "queued", node.raw, old.field_types,
                     node.trees)
    assert lines(compare({"caller": old}, {"caller": new}, [run])) == [
        "form caller: changed",
        "  pending Runs keeping their old tree: 1",
        "    r1  events/submit/0/background  (queued)",
        "  removed but used by 1 pending Run(s): action send_email at "
        "events/submit/0/background/do/0/call/0  [r1]",
    ]
    assert lines(compare({"caller": old}, {"caller": old}, [run]))[0].startswith("No impact")
