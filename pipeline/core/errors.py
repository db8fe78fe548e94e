"""The one exception type for failures a user can act on (bad input, missing file, mismatch)."""


class PipelineError(Exception):
    """An expected failure: the CLI prints its message on one line and exits non-zero."""


def one_line(e: BaseException, with_type: bool = True, limit: int | None = None) -> str:
    """An exception as one line: its type and the first line of its message (at most `limit`
    characters), for errors that wrap a library's failure."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if "TorchScript interpreter" in text:  # the scripted traceback ends with the real error
        text = lines[-1]
    text = text[:limit]
    if not with_type:
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
