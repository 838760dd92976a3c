"""The work directory: its file names and records."""
