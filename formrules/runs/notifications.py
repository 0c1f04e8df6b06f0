"""Notices left for people: a Run started or ended, a batch ended; e-mail copies; and the
live events pushed to their open pages.

Who is told what is decided here; `formrules.runs.lifecycle` calls `run_started` and
`run_ended` from the transitions that start and end a Run, and `changed` from every
transition, in the same transaction.

- A stored notice (the banner, the Notifications page) at the moments the node's
  `notify:` names: by default at the end only, as before the option existed.
- An e-mail copy when the node asks (`notify: {email: true | "<address template>"}`) or,
  for a notice at the end, when the owner's preference does (`User.email_on_end`). The
  address is fixed with the notice (`Notification.email_to`); `send_emails` sends it
  after the commit (the worker, right after the transition; the reconciler, for any left
  behind by a crash), each notice once: claimed by a guarded UPDATE, with a Message-ID
  derived from the notice so a repeat after a crash is dropped by receivers.
- A live event for every status change, published to Redis pub/sub on the owner's
  channel once the transaction commits (never for a rolled back one); the SSE endpoint
  (`formrules.web.events`) relays it to the owner's open pages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from formrules.language.tree import DEFAULT_NOTIFY, Notify
from formrules.store.db import known_record
from formrules.store.models import Batch, Notification, Record, Run, RunStatus, User, utcnow

log = logging.getLogger("formrules.runs.notifications")
EVENTS_KEY = "formrules.live_events"  # Session.info: events waiting for the commit
EMAILS_KEY = "formrules.notice_emails"  # Session.info: Runs whose notices want e-mail
_unsent: set[str] = set()  # Runs whose notice e-mails this process committed, not sent
CHANNEL_PREFIX = "formrules:events:"

Publisher = Callable[[list[tuple[str, str]]], Any]  # [(channel, JSON text)], at once
_publisher: Publisher | None = None


def channel(owner: str) -> str:
    """The pub/sub channel of one owner's live events."""
    return CHANNEL_PREFIX + owner


def set_publisher(publish: Publisher | None) -> None:
    """How this process publishes live events (Redis `PUBLISH`); set by `runtime.install`."""
    global _publisher
    _publisher = publish


def node_notify(run: Run) -> Notify:
    """The `notify:` of the node a Run carries (the default if it cannot be rebuilt)."""
    from formrules.runs.snapshot import Snapshot  # the snapshot module loads the checker
    if run.kind not in ("background", "delay"):
        return DEFAULT_NOTIFY
    try:
        return Snapshot.load(run.snapshot).node(run.node_path).notify
    except Exception:  # a snapshot this code cannot rebuild: its failure says why elsewhere
        return DEFAULT_NOTIFY


def _token(s: Session, run: Run) -> str | None:
    if run.record_id is None or run.batch_id is not None:
        return None
    known = known_record(s, run.record_id)  # the worker's claim read it already
    if known is not None:
        return known.token
    return s.scalar(select(Record.token).where(Record.id == run.record_id))


def changed(s: Session, run: Run, kind: str) -> None:
    """Queue a live event for the Run's owner (`kind`: start, end or status), published
    when this transaction commits."""
    payload = {"event": kind, "run": run.id, "record": _token(s, run), "status": run.status,
               "title": run.title}
    s.info.setdefault(EVENTS_KEY, []).append((run.owner, payload))


@event.listens_for(Session, "after_commit")
def _publish(session: Session) -> None:
    _unsent.update(session.info.pop(EMAILS_KEY, ()))
    items = session.info.pop(EVENTS_KEY, None)
    if not items or _publisher is None:
        return
    try:  # one round trip for the transaction's events (a Run's start and end, say)
        _publisher([(channel(owner), json.dumps(payload)) for owner, payload in items])
    except Exception as exc:  # open pages fall back to polling; nothing is lost
        log.warning("%d live event(s) of run %s not published: %s", len(items),
                    items[0][1]["run"], exc)


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(EVENTS_KEY, None)
    session.info.pop(EMAILS_KEY, None)


def _address(s: Session, run: Run, spec: Notify, moment: str) -> str | None:
    """Where an e-mail copy of this notice goes, if anywhere."""
    user = None
    if run.owner.startswith("user:") and run.owner[5:].isdigit():
        user = s.get(User, int(run.owner[5:]))
    if spec.email == "owner":
        return user.email if user is not None and user.email else None
    if spec.email:
        from formrules.language.sandbox import render
        from formrules.language.values import typed_record
        from formrules.runs.snapshot import Snapshot
        data = {}
        if run.record_id is not None:
            data = s.scalar(select(Record.data).where(Record.id == run.record_id)) or {}
        try:
            fields = Snapshot.load(run.snapshot).fields
            address = render(spec.email, {"record": typed_record(dict(data), fields)}).strip()
        except Exception as exc:  # a template that fails here must not fail the Run
            log.warning("run %s: notify e-mail address failed: %s", run.id, exc)
            return None
        return address[:254] if "@" in address and "\n" not in address else None
    if moment == "end" and user is not None and user.email_on_end and user.email:
        return user.email
    return None


def _notice(s: Session, run: Run, level: str, message: str, moment: str,
            spec: Notify) -> None:
    address = _address(s, run, spec, moment)
    s.add(Notification(owner=run.owner, run_id=run.id, record_token=_token(s, run),
                       level=level, message=message[:500], email_to=address))
    if address:
        s.info.setdefault(EMAILS_KEY, set()).add(run.id)


def run_started(s: Session, run: Run) -> None:
    """A Run's attempt started: a notice only when its node asks (`notify: [start]`)."""
    if run.batch_id is not None or run.hidden or run.attempt > 1:
        return  # a batch reports once; a retry is not a new start
    spec = node_notify(run)
    if "start" in spec.events:
        _notice(s, run, "info", f"{run.title}: started.", "start", spec)


def run_ended(s: Session, run: Run, level: str, message: str) -> None:
    """Tell a Run's owner how it ended, unless that is not news to them."""
    if run.batch_id is not None:
        return  # the batch tells its owner once, when it ends, not once per record
    if run.hidden:
        return  # its owner deleted it (cancel-and-delete): news of it would only confuse
    spec = node_notify(run)
    if "end" not in spec.events:
        return
    if not spec.explicit and run.awaited == "false" and level == "success" \
            and run.kind == "delay":
        return  # a reminder firing on schedule is not news to the person who submitted
    _notice(s, run, level, message, "end", spec)


def batch_ended(s: Session, batch: Batch, counts: dict[str, int]) -> None:
    """Tell a batch's owner how it ended: one notice for all its records."""
    done, failed = counts.get(RunStatus.DONE, 0), counts.get(RunStatus.DEAD, 0)
    level = "success" if batch.status == "done" else "error"
    s.add(Notification(owner=batch.owner, level=level,
                       batch_id=batch.id if batch.self_service else None, message=(
        f"{batch.title}: {batch.status}; {done} of {batch.total} done"
        + (f", {failed} failed" if failed else ""))[:500]))


def send_emails(store, settings, run_id: str | None = None, limit: int = 50) -> int:
    """Send the e-mail copies not sent yet (of one Run, or any); returns how many went.

    Each is claimed before it is sent (so two senders never both send it) and released
    again when sending fails, for the reconciler's next pass. For one Run, the database
    is only asked when this process committed an e-mail notice of it.
    """
    from formrules.actions import mail
    where = [Notification.email_to.is_not(None), Notification.emailed_at.is_(None)]
    if run_id is not None:
        if run_id not in _unsent:
            return 0
        _unsent.discard(run_id)
        where.append(Notification.run_id == run_id)
    with store.session() as s:
        pending = list(s.execute(select(Notification.id, Notification.email_to,
                                        Notification.message)
                                 .where(*where).order_by(Notification.id).limit(limit)))
    sent = 0
    for note_id, to, text in pending:
        with store.session() as s:
            claimed = s.execute(update(Notification).where(
                Notification.id == note_id, Notification.emailed_at.is_(None))
                .values(emailed_at=utcnow())).rowcount
        if not claimed:
            continue
        message = EmailMessage()
        message["From"] = settings.mail_from
        message["To"] = to
        message["Subject"] = " ".join(text.split())[:200]
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<notice-{note_id}@formrules>"
        message.set_content(f"{text}\n\nYour tasks are listed under My tasks.\n")
        try:
            mail.send(settings, message)
            sent += 1
        except Exception as exc:  # OSError from SMTP, a bad address: try again later
            log.warning("notice %s: e-mail to %s failed: %s", note_id, to, exc)
            with store.session() as s:
                s.execute(update(Notification).where(Notification.id == note_id)
                          .values(emailed_at=None))
    return sent
