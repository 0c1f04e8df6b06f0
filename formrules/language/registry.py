"""The rules a process uses right now: reloaded from disk within seconds, last good kept.

Every process (web, worker, reconciler) asks `current_rules(directory)` whenever it needs
the rules. At most once per `POLL_SECONDS` that call lists the directory and compares each
file's modification time and size (and, when those moved, a hash of its text, so a `touch`
costs nothing). A changed file is checked on its own:

- valid: its form replaces the old one (or appears, for a new file);
- invalid: its last good form stays in use, and the problems are kept for operators
  (`rules_status`, the admin banner, the readiness check) until the file is fixed;
- removed: its form is gone.

Polling on access rather than a file-watching thread (watchdog/inotify): RQ forks a
work-horse per job and forking with busy threads can copy held locks, inotify does not see
edits on many network and container mounts, and a stat of a few files per second is
nothing. Each change is logged once, as one line, by each process that notices it. Runs
already in flight do not use this: they carry the snapshot of the subtree they started with.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from formrules.errors import Problem, errors_in
from formrules.language.loader import parse_form
from formrules.language.tree import Form, RuleSet

log = logging.getLogger("formrules.rules")
POLL_SECONDS = 1.0  # how stale the rules a process uses can be


@dataclass
class _File:
    """What is known about one rule file."""

    signature: tuple[int, ...]  # (inode, mtime_ns, size): cheap to compare on every poll
    digest: str  # of the text last read
    good: Form | None = None  # the last version that passed the check
    problems: tuple[Problem, ...] = ()  # of the text on disk now; empty when it is good


@dataclass(frozen=True)
class RulesStatus:
    """The state of a rules directory for operators and the readiness check."""

    directory: str
    forms: tuple[str, ...]  # form ids in use
    broken: dict[str, tuple[Problem, ...]] = field(default_factory=dict)  # file -> problems
    stale: tuple[str, ...] = ()  # broken files whose last good version is still in use

    @property
    def ok(self) -> bool:
        """True when every file on disk is in use as written."""
        return not self.broken

    @property
    def ready(self) -> bool:
        """False only when nothing can be served: problems and not one form loaded."""
        return bool(self.forms) or not self.broken

    def summary(self) -> str:
        """One line for a banner or a readiness answer."""
        if self.ok:
            return f"{len(self.forms)} form(s) loaded"
        first = next(iter(self.broken.values()))[0]
        kept = f"; last good version kept for {', '.join(self.stale)}" if self.stale else ""
        return (f"{len(self.broken)} rule file(s) have problems{kept}. "
                f"First: {first}")


class RuleRegistry:
    """The forms of one rules directory, refreshed from disk on access (thread safe)."""

    def __init__(self, directory: str | Path, poll_seconds: float = POLL_SECONDS):
        self.directory = Path(directory)
        self.poll_seconds = poll_seconds
        self._files: dict[str, _File] = {}
        self._previous: dict[str, Form] = {}  # form id -> the version the last reload replaced
        self._ruleset = RuleSet({}, str(self.directory))
        self._status = RulesStatus(str(self.directory), ())
        self._checked = float("-inf")
        self._assembled = False
        self._lock = threading.Lock()
        self.refresh()

    def rules(self, max_age: float | None = None) -> RuleSet:
        """The rules now, re-read from disk if the last look is older than `max_age`."""
        self._maybe_refresh(max_age)
        return self._ruleset

    def status(self, max_age: float | None = None) -> RulesStatus:
        """Which files are broken and which forms are in use."""
        self._maybe_refresh(max_age)
        return self._status

    def previous(self, max_age: float | None = None) -> dict[str, Form]:
        """Form id -> the good version its latest reload in this process replaced (what
        `formrules impact` and the admin compare the version in use with)."""
        self._maybe_refresh(max_age)
        return dict(self._previous)

    def _maybe_refresh(self, max_age: float | None) -> None:
        age = self.poll_seconds if max_age is None else max_age
        if time.monotonic() - self._checked >= age:
            self.refresh()

    def refresh(self) -> bool:
        """Look at the directory now; True when the forms in use changed."""
        with self._lock:
            self._checked = time.monotonic()
            changed = False
            seen: set[str] = set()
            for path in self._listing():
                name = str(path)
                seen.add(name)
                try:
                    stat = path.stat()
                    signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                    known = self._files.get(name)
                    if known is not None and known.signature == signature:
                        continue
                    text = path.read_text(encoding="utf-8", errors="replace")
                except OSError:  # removed between the listing and the read: next poll
                    seen.discard(name)
                    continue
                changed |= self._update(name, signature, text)
            for name in sorted(set(self._files) - seen):
                gone = self._files.pop(name)
                log.info("rules: %s removed%s", name,
                         f"; form '{gone.good.id}' is no longer served" if gone.good else "")
                changed = True
            if changed or not self._assembled:
                self._assemble()
                self._assembled = True
            return changed

    def _listing(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted([*self.directory.glob("*.yaml"), *self.directory.glob("*.yml")])

    def _update(self, name: str, signature: tuple[int, ...], text: str) -> bool:
        """Check one changed file; log one line saying what happened to it."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        known = self._files.get(name)
        if known is not None and known.digest == digest:
            known.signature = signature  # touched, not changed
            return False
        form, found = parse_form(text, name)
        problems = errors_in(found)
        previous = known.good if known is not None else None
        if problems or form is None:
            self._files[name] = _File(signature, digest, previous, tuple(problems))
            kept = (f"keeping the last good version of form '{previous.id}'" if previous
                    else "not loaded")
            log.warning("rules: %s has %d problem(s), %s; first: %s", name, len(problems),
                        kept, problems[0] if problems else "unusable")
            return True
        self._files[name] = _File(signature, digest, form)
        for warning in found:  # deprecated spellings: served, and said once per change
            log.warning("rules: %s", warning)
        if previous is not None and previous.id == form.id:
            self._previous[form.id] = previous
        if known is None:
            log.info("rules: %s loaded (form '%s')", name, form.id)
        else:
            log.info("rules: %s reloaded (form '%s')", name, form.id)
        return True

    def _assemble(self) -> None:
        """Build the RuleSet from every file's good form; the first file keeps a form id."""
        forms: dict[str, Form] = {}
        broken: dict[str, tuple[Problem, ...]] = {}
        stale: list[str] = []
        for name, state in sorted(self._files.items()):
            if state.problems:
                broken[name] = state.problems
                if state.good is not None:
                    stale.append(name)
            form = state.good
            if form is None:
                continue
            if form.id in forms:
                problem = Problem(name, 1, 1, "form", f"form id '{form.id}' is also used by "
                                                      f"{forms[form.id].file}")
                broken[name] = (*broken.get(name, ()), problem)
                continue
            forms[form.id] = form
        if not self.directory.is_dir():
            broken[str(self.directory)] = (Problem(str(self.directory), 1, 1, "",
                                                   "no such directory"),)
        self._ruleset = RuleSet(forms, str(self.directory))
        self._status = RulesStatus(str(self.directory), tuple(sorted(forms)), broken,
                                   tuple(stale))


_registries: dict[str, RuleRegistry] = {}
_registries_lock = threading.Lock()


def registry(directory: str | Path) -> RuleRegistry:
    """This process's registry for `directory` (created, and loaded, on first use)."""
    key = str(Path(directory).resolve())
    with _registries_lock:
        found = _registries.get(key)
        if found is None:
            found = _registries[key] = RuleRegistry(directory)
        return found


def current_rules(directory: str | Path, max_age: float | None = None) -> RuleSet:
    """The rules to use now: every valid file, and the last good version of broken ones."""
    return registry(directory).rules(max_age)


def rules_status(directory: str | Path, max_age: float | None = None) -> RulesStatus:
    """For the readiness check and the admin banner: broken files and forms in use."""
    return registry(directory).status(max_age)
