"""One place where a Run's execution meets logs and metrics.

`attempt` binds the Run id and record token to every log line of the attempt, and
records the attempt's duration and outcome (done, retrying, dead...) by form and node,
from what the execution read anyway (its claim): no statement of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from formrules.process import logs, metrics

log = logging.getLogger("formrules.runs.observe")
NOT_RUN = {"not claimed"}  # the job found nothing to do: no attempt to record


@dataclass
class Attempt:
    """What the execution tells of the attempt as it goes: whose it is once claimed
    (`ran`), the Run's status when it ended, and the outcome (None: it raised)."""

    outcome: str | None = None
    status: str | None = None
    labels: tuple[str, str] | None = None  # (form, node) once claimed
    bound: bool = False  # inside `attempt`, which resets the log context after it

    def ran(self, form: str, node: str, token: str | None) -> None:
        """The Run was claimed: its labels, and its record's token for log lines."""
        self.labels = (form, node)
        if self.bound:  # (an execution outside `attempt`, the warm-up's, leaves it alone)
            logs.record_token.set(token)


@contextmanager
def attempt(run_id: str) -> Iterator[Attempt]:
    """Wrap one execution of `run_id` (see `formrules.runs.job.execute_run`): nothing is
    read for it; what the execution learns it says through the `Attempt`."""
    started = time.monotonic()
    result = Attempt(bound=True)
    with logs.bound(run_id, None):
        try:
            yield result
        finally:
            if result.labels is not None and result.outcome not in NOT_RUN:
                form, node = result.labels
                # Raised past the job (a lost lease, a database gone): its status is
                # another execution's to tell, or still running.
                metrics.run_attempt(form, node, result.status or "running",
                                    time.monotonic() - started)
