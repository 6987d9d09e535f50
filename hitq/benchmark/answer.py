"""Answer extraction, one rule for every back end (official and predecessor local code):
the text after the LAST `[Final Answer]:`, else after the last `Final Answer:`, stripped."""
from __future__ import annotations

MARKER = "[Final Answer]:"
LOOSE_MARKER = "Final Answer:"


def extract(raw: str) -> str | None:
    """The extracted answer, or None when the response has no answer marker (a retry case).
    An empty string is returned when the marker is present but nothing follows it."""
    for marker in (MARKER, LOOSE_MARKER):
        if marker in raw:
            return raw.rsplit(marker, 1)[1].strip()
    return None


def is_answer_complete(text_so_far: str) -> bool:
    """True once a `[Final Answer]:` answer is complete: a non-empty line after the marker
    (on the marker's line or, if that is blank, on the next non-blank line) ended by a newline.
    Used as a stopping criterion for one-line answers (not for chart code, see
    prompts.is_open_ended)."""
    at = text_so_far.rfind(MARKER)
    if at < 0:
        return False
    rest = text_so_far[at + len(MARKER):].lstrip()
    return "\n" in rest
