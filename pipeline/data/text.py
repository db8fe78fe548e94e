"""Text as token sequences: JSON-lines documents through a Hugging Face tokenizer from a local
directory (``jsonl:docs.jsonl?tokenizer=models/tok&length=512``).

Each non-blank line is a JSON object: ``{"text": ...}`` (another key with ``field=``), or
``{"prompt": ..., "completion": ...}``. The tokenizer is the directory's ``tokenizer.json``
(what every fast tokenizer saves), read by the `tokenizers` library: no download and no code
from the directory runs. The rules, stated once:

* a text is encoded with the tokenizer's special tokens (its post-processor: a BOS, say);
  a prompt likewise, its completion without them, appended: the prompt's tokens are the
  sequence's prompt length (``distil=completion`` distils only the completion's);
* ``overflow=split`` (default): a text longer than ``length`` tokens becomes consecutive
  sequences of ``length`` (a last piece of one token is dropped: it predicts nothing);
  ``overflow=truncate``: its first ``length`` tokens only. A prompt and completion longer
  than ``length`` is truncated, whatever ``overflow`` says; one whose prompt fills it is
  refused, naming the line;
* ``pack=1`` (texts only): the documents' tokens are joined in file order and cut into rows
  of exactly ``length`` (the last may be shorter), as in GPT pre-training: a row may span
  documents, and attention crosses the boundary;
* sequence ids count the sequences in file order, so they are stable for one file, tokenizer
  and set of options; ``limit=N`` keeps the first N.

The vocabulary is the tokenizer's (added tokens included); a model whose head is padded past
it is cut to it (`pipeline.models.hf`). The tokenizer's identity (sha256 of its token → id
map) is in every cache made from it, so a cache of another tokenizer is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data import Options
from pipeline.data.sequences import DISTIL, SequenceSet, register_sequence_source

INSTALL = "pip install 'kd-pipeline[hf]'"


def load_tokenizer(directory: str | Path, what: str) -> Any:
    """The `tokenizers.Tokenizer` saved in `directory`/tokenizer.json."""
    path = Path(directory).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise PipelineError(
            f"{what}: no tokenizer.json in {path} (save a fast tokenizer there: "
            "AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PipelineError(
            f"{what}: a tokenizer needs the tokenizers package ({INSTALL})"
        ) from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise PipelineError(f"{what}: {file} is not a readable tokenizer ({e})") from None


def tokenizer_identity(tok: Any, directory: str | Path) -> dict[str, Any]:
    """What a cache records of a tokenizer: its vocabulary size and the sha256 of its
    token → id map (two tokenizers with the same map encode to the same ids' meanings)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return {"kind": "hf-tokenizers", "path": str(directory), "vocab": len(vocab),
            "vocab_sha256": digest}  # fmt: skip


@register_sequence_source(
    "jsonl", options=("tokenizer", "length", "overflow", "pack", "field", "distil", "limit")
)
def jsonl(path: str, opts: Options) -> SequenceSet:
    """JSON-lines text ({"text"} or {"prompt", "completion"}) through a local HF tokenizer."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PipelineError(f"--data {opts.spec}: no such file {file}")
    if opts.get("tokenizer") is None:
        raise PipelineError(f"--data {opts.spec}: give the tokenizer: ?tokenizer=DIR")
    length, limit = opts.int("length", 512), opts.int("limit", 0)
    if length < 2 or limit < 0:
        raise PipelineError(f"--data {opts.spec}: length must be >= 2 and limit >= 0")
    tok = load_tokenizer(opts.get("tokenizer"), f"--data {opts.spec}")
    docs = _read_lines(file, opts.spec, opts.get("field", "text"))
    overflow = opts.choice("overflow", ("split", "truncate"))
    pack = opts.choice("pack", ("0", "1")) == "1"
    distil = opts.choice("distil", DISTIL)
    prompted = any(p is not None for p, _ in docs)
    if prompted and not all(p is not None for p, _ in docs):
        raise PipelineError(
            f"--data {opts.spec}: mixes text lines and prompt/completion lines; give one kind"
        )
    if prompted and pack:
        raise PipelineError(
            f"--data {opts.spec}: pack=1 joins texts; prompt/completion lines are not packed"
        )
    if distil == "completion" and not prompted:
        raise PipelineError(
            f"--data {opts.spec}: distil=completion needs every line to have a prompt"
        )
    pieces, prompts = _pieces(tok, docs, length, overflow, pack, opts.spec)
    pieces, prompts = pieces[: limit or None], prompts[: limit or None]
    tokens = np.zeros((len(pieces), length), np.int32)
    for row, piece in enumerate(pieces):
        tokens[row, : len(piece)] = piece
    return SequenceSet(
        spec=opts.spec,
        tokens=tokens,
        lengths=np.array([len(p) for p in pieces], np.int64),
        sequence_ids=np.arange(len(pieces), dtype=np.int64),
        vocab=tok.get_vocab_size(with_added_tokens=True),
        prompt_lengths=np.array(prompts, np.int64) if prompted else None,
        distil=distil,
        tokenizer=tokenizer_identity(tok, opts.get("tokenizer")),
    )


def _read_lines(file: Path, spec: str, field: str) -> list[tuple[str | None, str]]:
    """(prompt or None, text or completion) of every non-blank line."""
    docs = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PipelineError(f"--data {spec}: line {number} is not JSON ({e})") from None
            if (
                isinstance(row, dict)
                and isinstance(row.get("prompt"), str)
                and isinstance(row.get("completion"), str)
            ):
                docs.append((row["prompt"], row["completion"]))
            elif isinstance(row, dict) and isinstance(row.get(field), str):
                docs.append((None, row[field]))
            else:
                raise PipelineError(
                    f"--data {spec}: line {number} has no string {field!r} (or prompt and "
                    "completion)"
                )
    return docs


def _pieces(tok, docs, length: int, overflow: str, pack: bool, spec: str):
    """The sequences (lists of ids) of `docs` under the rules above, and their prompt lengths."""
    texts = tok.encode_batch([p if p is not None else t for p, t in docs])
    pieces, prompts = [], []
    if pack:
        flat = [i for e in texts for i in e.ids]
        pieces = [flat[a : a + length] for a in range(0, len(flat), length)]
        return [p for p in pieces if len(p) >= 2], []
    for number, ((prompt, text), enc) in enumerate(zip(docs, texts, strict=True), 1):
        ids = enc.ids
        if prompt is not None:
            if len(ids) >= length:
                raise PipelineError(
                    f"--data {spec}: document {number}'s prompt has {len(ids)} tokens, "
                    f"leaving no completion within length={length}"
                )
            completion = tok.encode(text, add_special_tokens=False).ids
            pieces.append((ids + completion)[:length])
            prompts.append(len(ids))
            continue
        cut = ids[:length] if overflow == "truncate" else ids
        pieces += [cut[a : a + length] for a in range(0, len(cut), length)
                   if len(cut[a : a + length]) >= 2]  # fmt: skip
    return pieces, prompts
