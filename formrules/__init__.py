"""formrules: forms and event trees in YAML, with background work on RQ.

The package root imports nothing heavy so that parsing (`formrules.language.loader`) never pulls in
Flask; the web app lives in `formrules.web` (`create_app`).
"""

__version__ = "0.1.0"
