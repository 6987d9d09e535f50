"""A pool that cannot reset a connection the server dropped logs one line, not a traceback;
every other record keeps its traceback."""
from __future__ import annotations

import io
import logging

from hitq.jobqueue.database import one_line_pool_errors


def test_pool_reset_errors_are_one_line_and_others_keep_their_traceback():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        one_line_pool_errors()
        one_line_pool_errors()  # idempotent
        assert sum(type(f).__name__ == "_PoolOneLine" for f in handler.filters) == 1
        try:
            raise RuntimeError("cannot exit pipeline mode while busy\nPQsendQuery not allowed in pipeline mode")
        except RuntimeError:
            logging.getLogger("sqlalchemy.pool.impl.QueuePool").error("Exception during reset or similar", exc_info=True)
            logging.getLogger("hitq.worker").error("claim failed", exc_info=True)
    finally:
        root.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Exception during reset or similar: cannot exit pipeline mode while busy"
    assert lines[1] == "claim failed" and lines[2].startswith("Traceback")
