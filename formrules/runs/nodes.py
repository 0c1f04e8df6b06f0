"""How many Runs each node of a form has in each state right now (the form diagram).

One grouped query per form, `GROUP BY node_path, status` over the states counted
(`lifecycle.NOW_STATES`), not one per node; the statuses fold into those named states.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from formrules.runs.lifecycle import NOW_STATES
from formrules.store.models import Run

_STATE_OF = {status.value: state for state, statuses in NOW_STATES.items()
             for status in statuses}


def node_counts(s: Session, form_id: str) -> dict[str, dict[str, int]]:
    """Node path -> state (`queued`, `running`, `retrying`, `waiting`, `dead`) -> Runs."""
    out: dict[str, dict[str, int]] = {}
    rows = s.execute(select(Run.node_path, Run.status, func.count())
                     .where(Run.form_id == form_id, Run.status.in_(sorted(_STATE_OF)))
                     .group_by(Run.node_path, Run.status))
    for path, status, count in rows:
        states = out.setdefault(path, {})
        state = _STATE_OF[status]
        states[state] = states.get(state, 0) + count
    return out
