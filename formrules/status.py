"""What a record's owner sees of its work: one view used by the page and the JSON."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import sandbox
from .models import Record, ResultFile, Run, RunStatus
from .tree import Form
from .values import typed_record


def run_view(run: Run, files: list[ResultFile] | None = None) -> dict[str, Any]:
    """A Run as its owner may see it: no internal error detail, ever."""
    view: dict[str, Any] = {
        "id": run.id,
        "title": run.title,
        "status": run.status,
        "progress": run.percent,
        "message": run.progress_message or "",
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        "awaited": run.awaited,
        "due_at": run.due_at.isoformat(timespec="seconds") if run.due_at else None,
        "finished_at": run.finished_at.isoformat(timespec="seconds") if run.finished_at
        else None,
        "files": [{"id": f.id, "filename": f.filename} for f in files or []],
    }
    if run.status == RunStatus.RETRYING:
        view["next_retry_at"] = view["due_at"]
    if run.status in (RunStatus.RETRYING, RunStatus.DEAD) and run.safe_error:
        view["error"] = run.safe_error
    return view


def record_status(s: Session, record: Record, form: Form | None) -> dict[str, Any]:
    """`{"done", "failed", "record", "runs", "message"}` for the waiting page and JSON."""
    runs = list(s.scalars(select(Run).where(Run.record_id == record.id)
                          .order_by(Run.created_at, Run.id)))
    files: dict[str, list[ResultFile]] = {}
    if runs:
        for f in s.scalars(select(ResultFile).where(ResultFile.run_id.in_([r.id for r in runs]))
                           .order_by(ResultFile.created_at)):
            files.setdefault(f.run_id, []).append(f)
    awaited = [r for r in runs if r.awaited in ("true", "optional")]
    done = all(r.is_final for r in awaited)
    failed = any(r.status == RunStatus.DEAD for r in awaited)
    message = None
    if done and not failed and form is not None and form.after_submit_message:
        types = form.field_types
        try:
            message = sandbox.render(form.after_submit_message,
                                     {"record": typed_record(record.data, types),
                                      "form": {"id": form.id, "title": form.title}})
        except Exception:  # an author's template bug must not hide the result
            message = "Done."
    elif done and not failed:
        message = "Done."
    percent = (sum(r.percent for r in awaited) // len(awaited)) if awaited else 100
    return {
        "done": done,
        "failed": failed,
        "progress": percent,
        "record": dict(record.data),
        "runs": [run_view(r, files.get(r.id)) for r in awaited],
        "other_runs": [run_view(r, files.get(r.id)) for r in runs if r not in awaited],
        "message": message,
    }
