"""Progress bars that show on a terminal and stay quiet in logs and CI."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm:  # noqa: F821
    """A tqdm bar on stderr, disabled when stderr is not a terminal; it stays on screen when
    done, so its last line (speed, loss) is still there to read."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("leave", True)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, **kwargs)
