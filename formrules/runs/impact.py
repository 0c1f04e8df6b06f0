"""The impact of the rules on disk on the work pending now (`formrules impact`, admin).

Reads the pending Runs (every status that is not final, `OPEN`) with their snapshots and
hands them to the pure comparison in `formrules.language.impact`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from formrules.language.impact import FormImpact, PendingRun, compare
from formrules.language.registry import registry
from formrules.language.tree import Form
from formrules.runs.snapshot import Snapshot
from formrules.store.models import OPEN, Run

ADMIN_LIMIT = 5000  # pending Runs the admin reads per page view (newest first)


def pending_runs(s: Session, limit: int | None = None) -> list[PendingRun]:
    """Runs not finished yet, newest first (all of them without `limit`)."""
    query = (select(Run.id, Run.form_id, Run.node_path, Run.status, Run.snapshot)
             .where(Run.status.in_(sorted(OPEN))).order_by(Run.created_at.desc(), Run.id))
    if limit is not None:
        query = query.limit(limit)
    out = []
    for row in s.execute(query):
        snapshot = Snapshot.load(row.snapshot or {})
        call = snapshot.call or {}
        out.append(PendingRun(row.id, row.form_id, row.node_path, row.status, snapshot.raw,
                              snapshot.fields, snapshot.trees, call.get("tree"),
                              tuple(sorted(call.get("inputs") or ()))))
    return out


def impact(s: Session, in_use: dict[str, Form], on_disk: dict[str, Form],
           limit: int | None = None) -> list[FormImpact]:
    """Per form: what replacing `in_use` with `on_disk` changes for pending Runs."""
    return compare(in_use, on_disk, pending_runs(s, limit))


def impact_now(s: Session, rules_dir: str | Path) -> list[FormImpact]:
    """For the admin: the latest reload each form had in this process (the version it
    replaced against the version in use), and every pending Run on an older tree."""
    found = registry(rules_dir)
    current = found.rules().forms
    before = {**current, **{k: v for k, v in found.previous().items() if k in current}}
    return impact(s, before, current, ADMIN_LIMIT)
