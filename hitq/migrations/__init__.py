"""Alembic migrations, shipped in the package (`script_location = hitq:migrations`)."""
