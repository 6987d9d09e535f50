"""Every error a user can cause, as one class each; the CLI prints the message as one line.

    HitqError
    ├── UsageError          bad option values (ids spec, gpu spec, modality, format)
    ├── DataError           dataset directory, QA file or table file problems
    ├── ModelDirError       a model directory that cannot be loaded
    ├── DatabaseError       unreachable, unsupported or unmigrated database
    ├── RunConfigConflict   re-enqueueing a run name with other settings
    ├── NotFound            a run or file that does not exist
    └── JobError            a failure of one job, recorded on the job with its `kind`
        ├── MissingInput    table or image file absent or a Git LFS pointer (kind "missing_input")
        ├── TooLong         cannot fit --max-input-tokens even after truncation (kind "too_long")
        ├── BadFormat       no `[Final Answer]:` after the retries (kind "bad_format")
        ├── BadInput        unreadable or malformed input (kind "bad_input")
        └── EngineError     inference back-end failures (kind "engine_error")
            └── EngineOOM   out of memory on the device (kind "oom")

A subclass's docstring is its default message.
"""
from __future__ import annotations


class HitqError(Exception):
    """hitq failed."""

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(HitqError):
    """Invalid option value."""


class DataError(HitqError):
    """The dataset could not be read."""


class ModelDirError(HitqError):
    """The model directory cannot be loaded."""


class DatabaseError(HitqError):
    """The database cannot be used."""


class RunConfigConflict(HitqError):
    """A run with this name exists with other settings: choose another --run name."""


class NotFound(HitqError):
    """Not found."""


class JobError(HitqError):
    """The job failed."""

    kind = "engine_error"

    def __init__(self, message: str | None = None, kind: str | None = None):
        super().__init__(message)
        if kind:
            self.kind = kind


class MissingInput(JobError):
    """Input file missing."""

    kind = "missing_input"


class TooLong(JobError):
    """The prompt cannot fit the token budget."""

    kind = "too_long"


class BadFormat(JobError):
    """The model did not produce a `[Final Answer]:` line."""

    kind = "bad_format"


class BadInput(JobError):
    """The input could not be parsed."""

    kind = "bad_input"


class EngineError(JobError):
    """The inference engine failed."""

    kind = "engine_error"


class EngineOOM(EngineError):
    """Out of device memory."""

    kind = "oom"
