"""Start a formrules worker: `python worker.py` (see `formrules worker --help`)."""

from formrules.process.worker import main

if __name__ == "__main__":
    main()
