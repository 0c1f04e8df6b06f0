"""Exceptions raised by formrules.

    FormrulesError            root: a clean message, CLI exit code 1
    ├── RuleError             rule files are invalid; carries every Problem found
    ├── ConfigError           settings or environment are unusable
    ├── ActionError           an action failed; `safe_message` is what end users may see
    │   ├── PermanentError    do not retry (bad input, 4xx answer, …)
    │   │   └── TemplateLimit a template crossed a sandbox bound (language/sandbox.py)
    │   ├── RetryableError    retry with backoff (timeouts, 5xx, connection refused, …)
    │   │   └── TimedOut      the Run went past its node's `timeout:`
    │   └── Cancelled         the run was cancelled; stop at this step
    ├── InvalidValues         an edit's values do not fit their fields (`errors` by field)
    ├── NotAllowed            a Run is in no state for this (cancel a done one, say)
    ├── BatchError            a batch cannot be started or cancelled as asked
    ├── LeaseLost             another execution owns the Run now; stop quietly
    └── RunFailed             raised out of an RQ job so RQ records it (the database retries)

Anything else raised while running a step is treated as retryable and shown to users as a
generic message: external errors and tracebacks are for operators only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GENERIC_FAILURE = "Something went wrong while processing this. The team has been told."
TIMED_OUT = "This took longer than allowed and was stopped."
# What a `try:` stores for a caught error with no message of formrules' own (an outside
# service's words never reach users): `The 'http_request' step failed.`
STEP_FAILED = "The '{step}' step failed."


@dataclass(frozen=True, order=True)
class Problem:
    """One mistake in a rule file, sortable by file, line and column.

    A `warning` (a deprecated spelling, say) is shown by `check` and the editor but does
    not stop the file from loading; an `error` does.
    """

    file: str
    line: int
    col: int
    path: str
    message: str
    excerpt: str = field(default="", compare=False)  # the source line and a caret, if useful
    severity: str = field(default="error", compare=False)  # "error" | "warning"

    @property
    def is_error(self) -> bool:
        """True unless this is only a warning."""
        return self.severity != "warning"

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        label = "warning: " if not self.is_error else ""
        text = f"{self.file}:{self.line}:{self.col}: {label}{where}{self.message}"
        return f"{text}\n{self.excerpt}" if self.excerpt else text


def errors_in(problems) -> list[Problem]:
    """The problems that stop a file from loading (warnings left out)."""
    return [p for p in problems if p.is_error]


class FormrulesError(Exception):
    """Root of the errors formrules expects and reports without a traceback."""


class ConfigError(FormrulesError):
    """Settings or the environment cannot be used."""


class RuleError(FormrulesError):
    """Rule files are invalid; `problems` lists every mistake, sorted."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(errors_in(problems))
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the rules"
        super().__init__(head + ":\n" + "\n".join(str(p) for p in self.problems))


class ActionError(FormrulesError):
    """An action failed. `safe_message` is shown to end users; the text is for operators."""

    retryable = True

    def __init__(self, message: str, safe_message: str | None = None):
        super().__init__(message)
        self.safe_message = safe_message or GENERIC_FAILURE
        # Whether the action's author wrote a message for end users (else the rule in
        # `user_message` decides what they read).
        self.has_safe_message = bool(safe_message)


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


class TimedOut(RetryableError):
    """The Run went past its node's `timeout:`."""

    def __init__(self, message: str):
        super().__init__(message, TIMED_OUT)


class InvalidValues(FormrulesError):
    """Some values do not fit their fields; `errors` maps field name to messages."""

    def __init__(self, errors: dict[str, list[str]]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in sorted(errors.items())))


class NotAllowed(FormrulesError):
    """The Run is not in a state where this operation makes sense."""


class BatchError(FormrulesError):
    """A batch cannot be started as asked (unknown batch, bad filter, no records)."""

    @property
    def sentence(self) -> str:
        """The message as a sentence for a page."""
        message = str(self)
        return message[:1].upper() + message[1:] + "."


def step_failed(step: str) -> str:
    """What users read when a step failed without a message meant for them."""
    return f"The step “{step.replace('_', ' ')}” failed."


def user_message(exc: BaseException, step: str | None) -> str:
    """The safe message rule: what the owner of a Run may read about why a step failed.

    Safe are only texts written for users: an `ActionError`'s `safe_message` when the
    action gave one (every built-in action does, http_request from the status code it
    got), the time limit's, the lost worker's. Anything else (a bug, a driver's error, an
    action that gave no message) may hold host names, paths or secrets: users read only
    which step failed ("The step “send email” failed."), or the generic sentence when no
    step was running. The full text goes to the trace and the log, for operators.
    """
    if isinstance(exc, ActionError) and exc.has_safe_message:
        return exc.safe_message
    if type(exc).__name__ == "JobTimeoutException":  # RQ's backstop fired
        return TIMED_OUT
    return step_failed(step) if step else GENERIC_FAILURE


class RunFailed(FormrulesError):
    """Raised out of the job so RQ records the failure (the database schedules any retry)."""
