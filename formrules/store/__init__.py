"""The database: tables, the engine and sessions, API tokens."""
