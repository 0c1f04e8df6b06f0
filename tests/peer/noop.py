"""Raw RQ's job: nothing at all (a module of its own, so a work-horse imports nothing)."""


def noop() -> None:
    """Do nothing."""
