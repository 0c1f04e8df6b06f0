"""Hostile rule files (alias bombs, deep nesting, huge files) end in a clear error, fast.

Each file is checked in a fresh interpreter that reports its peak traced memory, so a
bomb that still expanded would show as hundreds of megabytes (or a killed process), and
the `formrules check` command prints problems with positions, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from formrules.language import registry as registry_mod
from formrules.language.registry import RuleRegistry
from tests.helpers import ROOT

# 353 bytes: nine levels of nine aliases is 9**9 (387 million) strings once expanded.
BILLION_LAUGHS = 'form: lol\nlol: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + \
    "".join(f"l{i}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n"
            for i in range(8))
BOMBS = {
    "billion_laughs": (BILLION_LAUGHS, "more than 100000 values once its aliases"),
    "recursive_alias": ("form: r\nevents: &a\n  submit: [*a]\n", "refers to a value that "
                                                                    "contains it"),
    "recursive_list": ("form: r\nx: &a [*a, *a]\n", "refers to a value that contains it"),
    "deep_flow": ("form: d\nx: " + "[" * 20000 + "]" * 20000 + "\n", "nest deeper than 64"),
    "deep_flow_unclosed": ("form: d\nx: " + "{a: " * 20000 + "\n", "nest deeper than 64"),
    "deep_block": ("form: d\nx:\n" + "".join(" " * i + "- \n" for i in range(1, 1300)),
                   "nest deeper than 64"),
    "deep_aliases": ("form: d\n" + "".join(f"l{i}: &l{i} [*l{i - 1}]\n" if i else "l0: &l0 [1]\n"
                                           for i in range(200)), "nest deeper than 64"),
    "huge": ("form: h\ndescription: '" + "x" * 1_100_000 + "'\n", "at most 1000000"),
    "alias_in_key": ("form: k\nx: &a [1, 2]\n? *a\n: 1\n", "mapping keys must be plain text"),
}
# The child may use 1 GB at most, so a bomb that still expands fails fast with MemoryError
# instead of swapping the machine; it reports its peak resident size.
SCRIPT = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from formrules.language.loader import check_rules
    _, problems = check_rules(sys.argv[1])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"problems": [str(p) for p in problems],
                      "peak": int(hwm.split()[1]) * 1024}))
""")


def _check_in_subprocess(folder, deadline: float = 120) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True,
                         text=True, cwd=ROOT, timeout=deadline)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_rule_file_bomb_is_a_clear_error_with_bounded_memory(tmp_path, name):
    text, expected = BOMBS[name]
    (tmp_path / f"{name}.yaml").write_text(text)
    result = _check_in_subprocess(tmp_path)
    problems = result["problems"]
    assert any(expected in problem for problem in problems), problems
    for problem in problems:
        assert problem.startswith(f"{tmp_path}/{name}.yaml:")
        line, col = problem.split(":")[1:3]
        assert int(line) >= 1 and int(col) >= 1
    assert result["peak"] < 250_000_000, result["peak"]  # the billion laughs took gigabytes


def test_check_command_prints_a_bomb_as_a_problem_not_a_traceback(tmp_path):
    (tmp_path / "lol.yaml").write_text(BILLION_LAUGHS)
    (tmp_path / "deep.yaml").write_text("form: d\nx: " + "[" * 20000 + "]" * 20000 + "\n")
    out = subprocess.run([sys.executable, "-m", "formrules.cli", "check", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    assert f"{tmp_path}/deep.yaml:2:" in out.stdout
    assert f"{tmp_path}/lol.yaml:2:10: the file holds more than 100000 values" in out.stdout


@pytest.mark.slow  # 20 000 fields parsed in a child process: seconds, not the inner loop
def test_the_duplicate_field_check_is_linear(tmp_path):
    fields = "".join(f"  - name: f{i}\n    type: string\n" for i in range(20_000))
    (tmp_path / "big.yaml").write_text(f"form: big\nfields:\n{fields}  - name: f7\n")
    # Each name was compared with every earlier one: minutes, past this deadline.
    result = _check_in_subprocess(tmp_path, deadline=90)
    assert result["problems"] == [f"{tmp_path}/big.yaml:40003:11: fields/20000: duplicate "
                                  "field name 'f7'"]


def test_rule_loaders_of_workers_refuse_a_bomb_in_a_live_rules_folder(tmp_path, monkeypatch):
    (tmp_path / "ok.yaml").write_text("form: ok\n")
    live = RuleRegistry(tmp_path)
    assert set(live.rules(max_age=0).forms) == {"ok"}
    (tmp_path / "lol.yaml").write_text(BILLION_LAUGHS)
    assert set(live.rules(max_age=0).forms) == {"ok"}  # the other forms go on
    problems = live.status(max_age=0).broken[str(tmp_path / "lol.yaml")]
    assert "more than 100000 values" in problems[0].message
    parsed, parse = [], registry_mod.parse_form
    monkeypatch.setattr(registry_mod, "parse_form", lambda *a: parsed.append(a) or parse(*a))
    live.rules(max_age=0)  # what the web, the scheduler and workers call on every pass
    assert parsed == []  # remembered: the bomb is not parsed again while unchanged
    (tmp_path / "lol.yaml").unlink()
    assert set(live.rules(max_age=0).forms) == {"ok"} and live.status(max_age=0).ok
