"""Alembic migrations of the formrules database (run them with `formrules db upgrade`)."""
