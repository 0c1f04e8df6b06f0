"""Start a formrules worker: `python worker.py` (see `formrules worker --help`)."""

from formrules.process.metrics import use_multiprocess_dir

use_multiprocess_dir()  # before prometheus_client loads: work-horses are separate processes
from formrules.process.worker import main  # noqa: E402

if __name__ == "__main__":
    main()
