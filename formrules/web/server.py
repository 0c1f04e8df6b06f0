"""Production serving: gunicorn with N worker processes (`formrules web --workers N`).

Each gunicorn worker builds its own app (no preloading: database connections and the
Redis pool must not be shared across a fork). Metrics from all of them are summed from
PROMETHEUS_MULTIPROC_DIR; a worker that exits is marked dead there so its gauges go.
"""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from formrules.process import logs


def _child_exit(_server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


class Server(BaseApplication):
    """Gunicorn configured from arguments instead of a command line or a config file."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        """Apply our options to gunicorn's settings."""
        for key, value in self.options.items():
            if key in self.cfg.settings:  # newer settings are skipped on older gunicorns
                self.cfg.set(key, value)

    def load(self):
        """The WSGI app, built in each gunicorn worker."""
        from formrules.web import create_app
        return create_app()


def serve(host: str, port: int, workers: int, threads: int, timeout: int = 60) -> None:
    """Run gunicorn until it is stopped (SIGTERM: graceful, finishing requests)."""
    Server({
        "bind": f"{host}:{port}", "workers": workers, "threads": threads,
        "worker_class": "gthread", "timeout": timeout, "graceful_timeout": 30,
        "accesslog": "-", "child_exit": _child_exit, "proc_name": "formrules-web",
        # gunicorn 25+ opens a control socket in $HOME; a service user may have none.
        "control_socket_disable": True,
        # gunicorn's lines in the same format (text or JSON) as the app's.
        "logconfig_dict": logs.dict_config(),
    }).run()
