"""Where a cache lives: a local path, or an fsspec URL (``s3://bucket/teacher.zarr``,
``gs://...``, ``memory://...``, ``file://...``) for Zarr caches on object storage.

A local cache is a `Path`; a URL stays a string (pathlib would fold its ``//``). These few
functions are what the writer, the reader and the stages need of either: whether it exists,
its partial sibling, removing it, and moving a finished partial cache into place.

Object stores have no rename. A finished cache is published by copying every object of the
partial cache except its root ``zarr.json``, then that ``zarr.json`` (the one object that says
``complete``), then deleting the partial: until the last copy, the destination holds no root
``zarr.json`` and so is not a cache at all, never a half-written one that looks complete. An
old cache it replaces (--overwrite) loses its root ``zarr.json`` first, for the same reason;
its other objects are deleted once the new cache is published. The partial cache stays whole
until then, with a record of the run that wrote it, so a publish killed half-way is finished
by the next run of the same command.
Remote access needs the fsspec backend of its scheme (``pip install -e ".[s3]"`` for
s3fs); credentials come from that library's usual sources (environment, config files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.fsutil import check_writable
from pipeline.core.lock import kill_point

Location = Path | str  # a local path, or a URL string
ROOT_META = "zarr.json"
RECORDS = "progress"  # a partial cache's run records (`zarr_backend.RECORDS`)


def is_url(location: Any) -> bool:
    """Whether `location` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and "://" in location and not location.startswith("/")


def location(value: str | Path) -> Location:
    """`value` as a cache location: a URL stays a string, a local path becomes a `Path`
    (``file://`` URLs too: they are local)."""
    text = str(value)
    scheme, sep, rest = text.partition(":/")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+", scheme) and not rest.strip("/"):
        raise PipelineError(f"{text}: a URL with no path; give e.g. {scheme}://bucket/c.zarr")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+", scheme) and not rest.startswith("/"):
        raise PipelineError(f"{text}: did you mean {scheme}://{rest}? (a URL needs two slashes)")
    if text.startswith("file://"):
        return Path(text.removeprefix("file://")).expanduser()
    return text.rstrip("/") if is_url(text) else Path(text).expanduser()


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of `url` and the path of `url` on it; one line when the scheme's
    library is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = ' (pip install -e ".[s3]")' if url.lower().startswith("s3://") else ""
        raise PipelineError(f"{url}: {e}{extra}") from None
    except ValueError as e:
        raise PipelineError(f"{url}: not a storage URL fsspec knows ({e})") from None


def sibling(loc: Location, suffix: str) -> Location:
    """`loc` with `suffix` added to its name (``OUT.partial``)."""
    return loc + suffix if isinstance(loc, str) else loc.with_name(loc.name + suffix)


def exists(loc: Location) -> bool:
    """Whether anything is stored at `loc` (a URL: any object under it)."""
    if isinstance(loc, Path):
        return loc.exists() or loc.is_symlink()
    fs, root = filesystem(loc)
    return guarded(loc, lambda: fs.exists(root))


def read_meta(loc: Location) -> dict[str, Any] | None:
    """The root ``zarr.json`` of the Zarr group at `loc`, parsed; None if absent or unreadable
    (a storage failure other than a missing object is an error naming `loc`)."""
    try:
        if isinstance(loc, Path):
            text = (loc / ROOT_META).read_text()
        else:
            fs, root = filesystem(loc)
            text = guarded(loc, lambda: _cat_or_none(fs, f"{root}/{ROOT_META}"))
            if text is None:
                return None
        doc = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _cat_or_none(fs: Any, key: str) -> str | None:
    try:
        return fs.cat_file(key).decode()
    except FileNotFoundError:
        return None


def remove_url(url: str) -> None:
    """Delete every object under `url`, its root ``zarr.json`` first (see the module doc)."""
    fs, root = filesystem(url)
    if guarded(url, lambda: fs.exists(f"{root}/{ROOT_META}")):
        guarded(url, lambda: fs.rm_file(f"{root}/{ROOT_META}"))
    if guarded(url, lambda: fs.exists(root)):
        guarded(url, lambda: fs.rm(root, recursive=True))


def publish(partial: str, out: str) -> None:
    """Move the finished cache at URL `partial` to URL `out`, replacing any cache there, so
    that `out` is never a cache until it is the whole new one. The old cache's root goes
    first (its other objects may be overwritten by the copy); what is left of it is deleted
    only after the new cache is published. The partial cache's run records are not copied."""
    fs, src = filesystem(partial)
    _, dst = filesystem(out)
    found = guarded(partial, lambda: fs.find(src))
    keys = sorted(k for k in found if k != f"{src}/{ROOT_META}" and not _record(src, k))
    stale = set(guarded(out, lambda: fs.find(dst)))
    if f"{dst}/{ROOT_META}" in stale:
        guarded(out, lambda: fs.rm_file(f"{dst}/{ROOT_META}"))
        kill_point("publish-unrooted", out)
    targets = [dst + key[len(src) :] for key in keys]
    if keys:  # one call: the file system copies them concurrently where it can
        guarded(out, lambda: fs.copy(keys, targets))
    kill_point("publish-copied", out)
    guarded(out, lambda: fs.copy(f"{src}/{ROOT_META}", f"{dst}/{ROOT_META}"))
    kill_point("publish-rooted", out)
    stale -= {*targets, f"{dst}/{ROOT_META}"}
    if stale:
        guarded(out, lambda: fs.rm(sorted(stale)))
    remove_url(partial)


def _record(src: str, key: str) -> bool:
    """Whether `key` is one of a partial cache's run records (``progress/``)."""
    return key.startswith(f"{src}/{RECORDS}/")


def check_output(out: Location, overwrite: bool) -> None:
    """Refuse an existing output without `overwrite`, and one that cannot be written."""
    if isinstance(out, str):
        check_writable_url(out, overwrite)
    else:
        check_writable(out, overwrite)


def check_writable_url(url: str, overwrite: bool) -> None:
    """Refuse an existing cache at `url` without `overwrite`, and a bucket that is not there
    or not reachable, before any work."""
    fs, root = filesystem(url)
    if exists(url) and not overwrite:
        raise PipelineError(f"{url} already exists (pass --overwrite to replace it)")
    bucket = root.split("/", 1)[0]
    if "/" not in root.strip("/") and url.split("://")[0] not in ("memory", "file"):
        raise PipelineError(f"{url}: give a path inside the bucket, e.g. {url}/teacher.zarr")
    if "/" in root and not guarded(url, lambda: fs.exists(bucket)):
        raise PipelineError(f"cannot write {url}: {bucket} does not exist")


def size(loc: Location) -> int:
    """Bytes stored at `loc`."""
    if isinstance(loc, Path):
        if loc.is_file():
            return loc.stat().st_size
        return sum(p.stat().st_size for p in loc.rglob("*") if p.is_file())
    fs, root = filesystem(loc)
    return int(guarded(loc, lambda: fs.du(root)))


def guarded(url: str, action):
    """`action()`, with a storage failure (network, permissions) as one line naming `url`."""
    try:
        return action()
    except PipelineError:
        raise
    except Exception as e:  # s3fs, gcsfs, botocore...: each library raises its own
        raise PipelineError(f"{url}: storage error: {one_line(e)}") from None
