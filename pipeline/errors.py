"""The one exception type for failures a user can act on (bad input, missing file, mismatch)."""


class PipelineError(Exception):
    """An expected failure: the CLI prints its message on one line and exits non-zero."""
