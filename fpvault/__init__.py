"""fpvault: a content-addressed, incremental backup store for PostgreSQL."""

__version__ = "0.1.0"
