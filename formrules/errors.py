"""Exceptions raised by formrules.

    FormrulesError            root: a clean message, CLI exit code 1
    ├── RuleError             rule files are invalid; carries every Problem found
    ├── ConfigError           settings or environment are unusable
    └── ActionError           an action failed; `safe_message` is what end users may see
        ├── PermanentError    do not retry (bad input, 4xx answer, …)
        │   └── TemplateLimit a template crossed a sandbox bound (language/sandbox.py)
        ├── RetryableError    retry with backoff (timeouts, 5xx, connection refused, …)
        └── Cancelled         the run was cancelled; stop at this step

Anything else raised while running a step is treated as retryable and shown to users as a
generic message: external errors and tracebacks are for operators only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GENERIC_FAILURE = "Something went wrong while processing this. The team has been told."


@dataclass(frozen=True, order=True)
class Problem:
    """One mistake in a rule file, sortable by file, line and column."""

    file: str
    line: int
    col: int
    path: str
    message: str
    excerpt: str = field(default="", compare=False)  # the source line and a caret, if useful

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{self.file}:{self.line}:{self.col}: {where}{self.message}"
        return f"{text}\n{self.excerpt}" if self.excerpt else text


class FormrulesError(Exception):
    """Root of the errors formrules expects and reports without a traceback."""


class ConfigError(FormrulesError):
    """Settings or the environment cannot be used."""


class RuleError(FormrulesError):
    """Rule files are invalid; `problems` lists every mistake, sorted."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the rules"
        super().__init__(head + ":\n" + "\n".join(str(p) for p in self.problems))


class ActionError(FormrulesError):
    """An action failed. `safe_message` is shown to end users; the text is for operators."""

    retryable = True

    def __init__(self, message: str, safe_message: str | None = None):
        super().__init__(message)
        self.safe_message = safe_message or GENERIC_FAILURE


class PermanentError(ActionError):
    """Retrying cannot help: the run goes to the dead list at once."""

    retryable = False


class RetryableError(ActionError):
    """A passing failure: the run is retried with backoff."""


class Cancelled(ActionError):
    """The run was cancelled by its owner or an operator."""

    retryable = False

    def __init__(self, message: str = "cancelled"):
        super().__init__(message, "Cancelled.")


class LeaseLost(FormrulesError):
    """Another execution took over this run (after a missed heartbeat); stop quietly."""
