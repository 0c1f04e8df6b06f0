"""Templates cannot exhaust a worker: every value, output and loop is bounded.

Each hostile template runs in a fresh interpreter limited to 1 GB of address space that
reports its peak resident memory: before the bounds, several of these built hundreds of
megabytes (or gigabytes) from one line. A runaway template in a Run fails its step once
with a clear permanent error; the worker carries on with the next job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formrules.errors import PermanentError
from formrules.language import sandbox
from formrules.language.sandbox import TemplateLimit, evaluate, render
from formrules.store.models import RunStatus
from tests.helpers import ROOT, WorkerProcess, examples, runs_of, submit, token_of, wait_until

RUNAWAY = [
    "{{ ('x' * 100000) | center(100000000) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ 'x'.rjust(10**9) }}{{ 'x'.zfill(10**9) }}",
    "{{ ([('x' * 1000)] * 1000) | join('') }}",
    "{{ (['x' * 50000] * 50000) | join }}",
    "{{ ((['x'] * 100000) | join('y' * 10000)) }}",
    "{{ range(100000) | map('string') | join('y' * 100) }}",
    "{{ '%999999999s' % 1 }}",
    "{{ '%0999999999d' | format(1) }}",
    "{{ '%*s' % (999999999, 'x') }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{:{}}'.format(1, 10**9) }}",
    "{{ '{0:.999999999f}'.format(1.5) }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(100) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='xx') %}{% for i in range(100) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s=[1]) %}{% for i in range(100) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(x=10**1000) %}{% for i in range(100) %}"
    "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "{{ ((10**1000)**1000)**1000 }}",
    "{% set x = [1] * 1000 %}{% set y = [x] * 1000 %}{% set z = [y] * 1000 %}{{ z }}",
    "{% set x = ['abc'] * 1000 %}{% set y = [x,x,x,x,x,x,x,x,x,x] %}"
    "{% set z = [y,y,y,y,y,y,y,y,y,y] %}{% set w = [z,z,z,z,z,z,z,z,z,z] %}{{ w }}",
    "{% set x = ['abc'] * 1000 %}{% set y = [x,x,x,x,x,x,x,x,x,x] %}"
    "{% set z = [y,y,y,y,y,y,y,y,y,y] %}{% set w = [z,z,z,z,z,z,z,z,z,z] %}"
    "{{ w | string | length }}{{ w | tojson | length }}{{ w | pprint | length }}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{% set s %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}",
    "{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
    "{{ ('x' * 100000) | replace('x', 'y' * 1000) }}",
    "{{ ('x' * 100000).replace('x', 'y' * 1000) }}",
    "{{ ('a\\n' * 50000) | indent(1000) }}",
    "{{ ('a\\n' * 50000) | indent('x' * 1000) }}",
    "{{ [1] | batch(1000000000, 0) | list }}",
    "{{ [1] | slice(1000000000) | list }}",
    "{{ ([[1] * 100000] * 10) | sum(start=[]) }}",
    "{{ ('\\t' * 100000).expandtabs(1000) }}",
    "{{ ('x' * 100000) | wordwrap(1, wrapstring='y' * 1000) }}",
    "{{ ('x' * 100000) | list | join('y' * 100) }}",
    "{{ ('x' * 100000) | truncate(1000000000) | center(2000000) }}",
    "{{ lipsum(1000000) }}",
]
SCRIPT = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from formrules.language.sandbox import render
    outcomes = []
    for source in json.loads(sys.stdin.read()):
        try:
            outcomes.append(f"rendered {len(render(source, {}))} characters")
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    peak = int(hwm.split()[1]) * 1024
    print(json.dumps({"outcomes": outcomes, "peak": peak}))
""")


def test_runaway_templates_end_in_a_clear_error_with_bounded_memory():
    out = subprocess.run([sys.executable, "-c", SCRIPT], input=json.dumps(RUNAWAY),
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]  # a MemoryError would end it here
    result = json.loads(out.stdout)
    for source, outcome in zip(RUNAWAY, result["outcomes"], strict=True):
        assert outcome.startswith(("TemplateLimit: template limit:", "UndefinedError")), \
            (source, outcome)
    assert result["peak"] < 300_000_000, result["peak"]


@pytest.mark.parametrize(("source", "expected"), [
    ("Hello {{ record.name }}", "Hello Ann"),
    ("{{ record.tags | join(', ') }}", "a, b"),
    ("{% for t in record.tags %}[{{ t }}]{% endfor %}", "[a][b]"),
    ("{% for t in record.tags recursive %}{{ loop.index }}{% endfor %}", "12"),
    ("{{ 'n' ~ record.n ~ '!' }}", "n3!"),
    ("{{ '%05.1f' % 3.14159 }} {{ '%s-%s' | format(1, 2) }}", "003.1 1-2"),
    ("{{ '{:>5}|{:.2f}'.format('x', 2) }}", "    x|2.00"),
    ("{{ record.name.ljust(5) }}|{{ record.name | center(7) }}|", "Ann  |  Ann  |"),
    ("{{ '-' * 40 }}", "-" * 40),
    ("{{ [1, 2] * 2 }} {{ 2 ** 10 }} {{ record.n * 4 }}", "[1, 2, 1, 2] 1024 12"),
    ("{% set ns = namespace(a=1) %}{% for i in range(3) %}{% set ns.a = ns.a * 2 %}"
     "{% endfor %}{{ ns.a }}", "8"),
    ("{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(1) }}", "<1>"),
    ("{% set s %}a{{ record.n }}{% endset %}{{ s }}", "a3"),
    ("{{ record.missing }}|{{ none }}", "|"),
    ("{{ record.text | replace('a', 'bb') | indent(2) | wordwrap(20) | truncate(30) }}",
     "bbbbbb"),
])
def test_ordinary_templates_still_render(source, expected):
    variables = {"record": {"name": "Ann", "tags": ["a", "b"], "n": 3, "text": "aaa"}}
    assert render(source, variables) == expected


def test_expressions_are_bounded_too():
    assert evaluate("record.n * 2", {"record": {"n": 2}}) == 4
    with pytest.raises(TemplateLimit):
        evaluate("[[1] * 1000] * 1000", {})
    with pytest.raises(TemplateLimit):  # what `set` stores must be bounded as well
        evaluate("[x, x, x, x, x, x, x, x, x, x, x, x]", {"x": ["y" * 100_000]})


def test_a_limit_is_a_permanent_error_with_words_for_users():
    with pytest.raises(TemplateLimit) as caught:
        render("{{ 'x'.ljust(10**9) }}", {})
    assert isinstance(caught.value, PermanentError) and not caught.value.retryable
    assert "10**9" not in caught.value.safe_message
    assert "more work than a step may do" in caught.value.safe_message


def test_html_templates_escape_what_they_insert_but_not_their_own_markup():
    variables = {"record": {"name": "<script>x</script>", "tags": ["<i>"]}}
    html = sandbox.render("<p>Hi {{ record.name }}, {{ record.tags | join(', ') }}"
                          "{{ '<b>' ~ record.name }}</p>", variables, html=True)
    assert html == ("<p>Hi &lt;script&gt;x&lt;/script&gt;, &lt;i&gt;"
                    "&lt;b&gt;&lt;script&gt;x&lt;/script&gt;</p>")
    assert sandbox.render("{{ '<b>ok</b>' | safe }}", {}, html=True) == "<b>ok</b>"
    assert sandbox.render("<{{ x }}>", {"x": "<b>"}) == "<<b>>"  # plain text stays plain


# Generated templates: any mix of growth operations either renders or stops at a limit.
_piece = st.sampled_from([
    "{{ s ~ s }}", "{{ s * 3 }}", "{{ (s * 1000) | center(%d) }}", "{{ [s] * %d }}",
    "{{ s.ljust(%d) }}", "{{ '%%%ds' %% s }}", "{{ '{:>%d}'.format(s) }}",
    "{%% for i in range(%d) %%}{{ s }}{%% endfor %%}", "{{ (s * %d) | join(s) }}",
    "{{ (s * 100) | replace('x', s * %d) }}", "{{ [[s] * 1000] * %d }}",
])


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.tuples(_piece, st.integers(0, 10**9)), min_size=1, max_size=4),
       st.text(alphabet="xy", min_size=1, max_size=50))
def test_generated_growth_renders_or_stops_at_a_limit(pieces, s):
    source = "".join(p % n if "%d" in p else p.replace("%%", "%") for p, n in pieces)
    try:
        out = render(source, {"s": s})
    except TemplateLimit:
        return
    except (TypeError, ValueError, OverflowError):
        return  # ordinary errors of the template itself (e.g. a width too big for C)
    assert len(out) <= sandbox.MAX_OUTPUT


RUNAWAY_FORM = """
form: runaway
fields:
  - {name: name, type: string}
  - {name: note, type: string}
events:
  submit:
    - background:
        title: Runaway
        do:
          - set: {note: "{{ record.name.ljust(10**9) }}"}
"""


@pytest.fixture
def runaway_rules(rules_dir):
    """The runaway form, in the rules folder before the app loads it."""
    (rules_dir / "runaway.yaml").write_text(RUNAWAY_FORM)


@pytest.mark.slow
def test_a_runaway_template_fails_its_run_once_and_the_worker_goes_on(
        runaway_rules, client, rt, subprocess_env):
    tokens = [token_of(submit(client, "runaway", {"name": name})) for name in ("Ann", "Bo")]
    with WorkerProcess(subprocess_env):  # one worker: the second Run needs it alive
        for token in tokens:
            wait_until(lambda t=token: runs_of(rt, t)[0].status == RunStatus.DEAD, timeout=60)
    for token in tokens:
        (run,) = runs_of(rt, token)
        assert run.attempt == 1  # permanent: not retried 8 times over two days
        assert run.safe_error == "This form's rules asked for more work than a step may do."
        assert "template limit: a width of 1000000000" in run.last_error
