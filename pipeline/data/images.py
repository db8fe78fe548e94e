"""Image folders read with Pillow: class sub-folders (labelled), or one flat folder (unlabelled).

Images are decoded batch by batch (in DataLoader workers during precompute), never all held
as files' bytes; `ts.inputs[...]` decodes only the rows it names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError, one_line
from pipeline.data import (
    NORMALIZE_OPTIONS,
    LazyInputs,
    Normalize,
    Options,
    TransferSet,
    default_workers,
    register_source,
)

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MODES = {"RGB": 3, "L": 1, "RGBA": 4}  # Pillow mode → channels; the first is the default


@register_source("imagefolder", options=("size", "mode", "workers", *NORMALIZE_OPTIONS))
def imagefolder(arg: str, opts: Options) -> TransferSet:
    """Image files in class sub-folders, or one flat folder (unlabelled), read with Pillow.

    inputs (N, C, H, W) float32: pixels / 255, then (x - mean) / std per channel. Without
    `size` every image must have the same size; with it each is resized to exactly HxW
    (bilinear). Classes are the sub-folder names, sorted. A sample's id is a hash of its path
    relative to DIR without the extension, so it survives adding files and matches the same
    sample stored elsewhere as another format (cross-modal).
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise PipelineError(
            f"--data {opts.spec}: image folders need Pillow: pip install pillow"
        ) from None
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise PipelineError(f"--data {opts.spec}: {root} is not a directory")
    files, labels, class_names = _scan(root, opts.spec)
    mode = opts.choice("mode", tuple(MODES))
    size = opts.size("size")
    reader = ImageReader(
        opts.spec,
        files,
        mode,
        size or _common_size(files, opts.spec),
        resize=size is not None,
        norm=Normalize.from_options(opts, divide=255.0),
    )
    reader.norm.check(opts.spec, MODES[mode])
    workers = opts.int("workers", default_workers())
    if workers < 0:
        raise opts.error("workers", "an integer >= 0")
    return TransferSet(
        spec=opts.spec,
        inputs=LazyInputs(len(files), (MODES[mode], *reader.size), reader, workers=workers),
        labels=labels,
        sample_ids=_path_ids(root, files, opts.spec),
        class_names=class_names,
    )


class ImageReader:
    """Decodes rows of an image folder into a float32 batch (B, C, H, W); picklable for workers."""

    def __init__(
        self,
        spec: str,
        files: list[Path],
        mode: str,
        size: tuple[int, int],
        resize: bool,
        norm: Normalize,
    ):
        self.spec, self.files, self.mode = spec, files, mode
        self.size, self.resize, self.norm = size, resize, norm

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.norm(np.stack([self.decode(self.files[i]) for i in rows]))

    def decode(self, path: Path) -> np.ndarray:
        """One image as uint8 (C, H, W)."""
        from PIL import Image

        h, w = self.size
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)  # decodes: a truncated file fails here
                if image.size != (w, h):
                    if not self.resize:
                        raise PipelineError(
                            f"--data {self.spec}: {path} is {image.size[1]}x{image.size[0]} "
                            f"but the other images are {h}x{w}; give a size, e.g. ?size={h}"
                        )
                    image = image.resize((w, h), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
        except PipelineError:
            raise
        except Exception as e:  # Pillow raises many types for a bad file
            raise PipelineError(
                f"--data {self.spec}: unreadable image {path} ({one_line(e)})"
            ) from None
        return pixels.reshape(h, w, -1).transpose(2, 0, 1)


def _scan(root: Path, spec: str) -> tuple[list[Path], np.ndarray, list[str] | None]:
    """Image files in a fixed order, their labels (N,) and the class names (None: flat folder)."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in SUFFIXES]
    kinds = ", ".join(SUFFIXES)
    if not class_dirs:
        if not loose:
            raise PipelineError(f"--data {spec}: no images in {root} (looked for {kinds})")
        return loose, np.full(len(loose), -1, np.int64), None
    if loose:
        raise PipelineError(
            f"--data {spec}: {loose[0]} lies beside the class folders; put every image in a "
            "class folder (a folder of images alone is read as unlabelled data)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, folder in enumerate(class_dirs):
        found = sorted(
            (
                p
                for p in folder.rglob("*")
                if p.suffix.lower() in SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            ),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        if not found:
            raise PipelineError(
                f"--data {spec}: class folder {folder} has no images (looked for {kinds})"
            )
        files += found
        labels += [index] * len(found)
    return files, np.asarray(labels, np.int64), [d.name for d in class_dirs]


def _common_size(files: list[Path], spec: str) -> tuple[int, int]:
    """The one (H, W) of every image, from the headers only; mixed sizes are an error."""
    from PIL import Image

    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        try:
            with Image.open(path) as image:
                hw = (image.size[1], image.size[0])
        except Exception as e:
            raise PipelineError(f"--data {spec}: unreadable image {path} ({one_line(e)})") from None
        if first is None:
            first = (path, hw)
        elif hw != first[1]:
            (a, (ha, wa)), (hb, wb) = first, hw
            raise PipelineError(
                f"--data {spec}: images differ in size ({a} is {ha}x{wa}, {path} is {hb}x{wb}); "
                f"give one with ?size=HxW, e.g. ?size={ha}x{wa}"
            )
    assert first is not None  # _scan never returns an empty list
    return first[1]


def _path_ids(root: Path, files: list[Path], spec: str) -> np.ndarray:
    """63-bit hash of each file's path relative to `root`, without the extension.  # (N,)"""
    ids = np.empty(len(files), np.int64)
    seen: dict[int, Path] = {}
    for i, path in enumerate(files):
        key = path.relative_to(root).with_suffix("").as_posix()
        digest = hashlib.sha256(key.encode()).digest()
        ids[i] = int.from_bytes(digest[:8], "little") & (2**63 - 1)
        if int(ids[i]) in seen:
            raise PipelineError(
                f"--data {spec}: {seen[int(ids[i])]} and {path} differ only in the extension; "
                "a sample's id is its path without it"
            )
        seen[int(ids[i])] = path
    return ids
