"""`formrules users`: add (asked twice, or from stdin), list, passwd and remove."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner
from sqlalchemy import select
from werkzeug.security import check_password_hash

from formrules.cli import cli
from formrules.errors import FormrulesError
from formrules.store.models import User
from tests.helpers import ROOT


def invoke(env: dict, *args: str, input: str | None = None):
    env = {k: v for k, v in env.items() if k != "FORMRULES_PASSWORD"}
    return CliRunner().invoke(cli, list(args), env=env, input=input)


def user(rt, name: str) -> User | None:
    with rt.store.session() as s:
        return s.scalar(select(User).where(User.name == name))


def test_add_asks_for_the_password_twice_until_both_agree(rt, subprocess_env):
    result = invoke(subprocess_env, "users", "add", "ann",
                    input="first-try-1\nfirst-try-2\nsecond-try\nsecond-try\n")
    assert result.exit_code == 0, result.output
    assert "do not match" in result.output
    assert result.output.count("Repeat the password") == 2
    assert check_password_hash(user(rt, "ann").password_hash, "second-try")


def test_add_reads_the_password_from_stdin_for_scripts(rt, subprocess_env):
    result = invoke(subprocess_env, "users", "add", "bot", "--operator", "--password-stdin",
                    input="from-a-script\nignored\n")
    assert result.exit_code == 0, result.output
    assert "Password" not in result.output  # nothing asked
    saved = user(rt, "bot")
    assert saved.is_operator and check_password_hash(saved.password_hash, "from-a-script")


def test_a_short_password_is_refused(rt, subprocess_env):
    result = invoke(subprocess_env, "users", "add", "cy", "--password-stdin", input="short\n")
    assert isinstance(result.exception, FormrulesError)
    assert user(rt, "cy") is None


def test_list_passwd_and_remove(rt, subprocess_env):
    for name, flags in (("olga", ["--operator"]), ("dan", [])):
        assert invoke(subprocess_env, "users", "add", name, *flags, "--password-stdin",
                      input="long-enough\n").exit_code == 0
    listed = invoke(subprocess_env, "users", "list")
    assert listed.exit_code == 0
    assert [line.split()[:2] for line in listed.output.splitlines()] == [
        ["dan", "user"], ["olga", "operator"]]

    generation = user(rt, "dan").session_generation
    changed = invoke(subprocess_env, "users", "passwd", "dan", input="new-secret\nnew-secret\n")
    assert changed.exit_code == 0, changed.output
    assert check_password_hash(user(rt, "dan").password_hash, "new-secret")
    assert user(rt, "dan").session_generation == generation + 1  # old sessions end
    assert isinstance(invoke(subprocess_env, "users", "passwd", "nobody",
                             "--password-stdin", input="new-secret\n").exception,
                      FormrulesError)

    assert invoke(subprocess_env, "users", "remove", "dan").exit_code == 0
    assert user(rt, "dan") is None and user(rt, "olga") is not None
    missing = subprocess.run([sys.executable, "-m", "formrules.cli", "users", "remove", "dan"],
                             env=subprocess_env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and missing.stderr == "error: no user named 'dan'\n"
