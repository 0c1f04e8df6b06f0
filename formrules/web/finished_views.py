"""Status views of finished work, kept per web process.

A poll without an ETag (an API client's loop, a script, a page's first poll) of a
record whose work is over would read and build the same view again each time. Such a
record's token is remembered with its ETag and answer: its next poll reads the change
tag alone (one cheap statement, as a revalidation does), checks the owner as always,
and sends the kept answer while the tag is unchanged.

Only views that cannot change unless the tag does are kept: every Run listed is final
(no ETA moving with the clock) and the form's after-submit message is plain text (a
template could call `now()`). The form is part of the key, so a reloaded form rebuilds.
"""

from __future__ import annotations

from typing import Any

from formrules.language.tree import Form

MAX_VIEWS = 1024  # tokens kept per process (all dropped when full: simple and bounded)
MAX_BYTES = 64 * 1024  # larger answers are built each time rather than held


class FinishedViews:
    """Token -> (ETag, form, JSON text) of finished records' status views."""

    def __init__(self, size: int = MAX_VIEWS):
        self.size = size
        self._views: dict[str, tuple[str, Form | None, str]] = {}

    def known(self, token: str) -> bool:
        """Whether a view of `token` is kept (its poll may start with the tag alone)."""
        return token in self._views

    def get(self, token: str, etag: str, form: Form | None) -> str | None:
        """The kept answer, if it was made for this ETag and this version of the form."""
        kept = self._views.get(token)
        if kept is None or kept[0] != etag or kept[1] is not form:
            return None
        return kept[2]

    def keep(self, token: str, etag: str, form: Form | None, view: dict[str, Any],
             body: str) -> None:
        """Remember `body` if `view` is one that only a new tag can change."""
        if not _settled(view, form) or len(body) > MAX_BYTES:
            self._views.pop(token, None)
            return
        if len(self._views) >= self.size:
            self._views.clear()
        self._views[token] = (etag, form, body)


def _settled(view: dict[str, Any], form: Form | None) -> bool:
    message = form.after_submit_message if form is not None else None
    return view["state"] != "working" and "{" not in (message or "") \
        and all(run["final"] for run in (*view["runs"], *view["other_runs"]))
