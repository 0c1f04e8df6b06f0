"""Flask's hello world: the floor for any Flask endpoint on this machine."""

from flask import Flask


def create_app() -> Flask:
    """One route, one string."""
    app = Flask(__name__)

    @app.get("/hello")
    def hello():
        return "Hello, World!"

    return app
