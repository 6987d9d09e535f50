"""The `hitq` command. Imports nothing heavy at import time."""
