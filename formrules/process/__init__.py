"""Processes: per-process resources, the worker, the private Redis, child processes."""
