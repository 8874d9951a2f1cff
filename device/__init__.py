"""Reference device client: a local SQLite copy of one user's offline view."""
