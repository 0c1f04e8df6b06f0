"""Helpers for the child processes formrules starts (Redis, worker, reconciler)."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def die_with_parent() -> None:
    """Linux: have the kernel stop this process when its parent dies (even by SIGKILL).

    Used as `preexec_fn`, it is armed before the child program starts; a parent that died
    before that leaves the child to its own start-up checks (see `worker.reconciler_main`).
    The child also ignores SIGHUP: a closing terminal hangs up its whole process group, and
    the parent stops its children in order (the worker before its Redis), not the terminal.
    """
    with contextlib.suppress(ValueError):  # only a main thread may; then the default stays
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Not Linux (no libc.so.6 / prctl): the parent's own cleanup still applies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
