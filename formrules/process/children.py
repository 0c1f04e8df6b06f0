"""Helpers for the child processes formrules starts (Redis, workers)."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def die_with_parent() -> None:
    """Linux: have the kernel stop this process when its parent dies (even by SIGKILL).

    Used as `preexec_fn`, it is armed before the child program starts.
    """
    # Not Linux (no libc.so.6 / prctl): the parent's own cleanup still applies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
