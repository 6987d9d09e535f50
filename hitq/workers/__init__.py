"""Worker processes: the supervisor (one process per device) and the claim → run → finish loop."""
