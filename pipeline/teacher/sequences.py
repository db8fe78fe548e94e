"""Stage one for language models: a causal teacher over a sequence transfer set, cached per
token as top-k (`pipeline.cache.tokens`).

The rows of the cache are the distilled positions of the sequences, in order; its shards are
runs of rows. Shard k runs the teacher on the sequences its rows belong to, in batches of
`batch_size` sequences counted from the shard's first sequence (so a resumed run, or another
process, makes exactly the same forward calls), and keeps, of each (b, L, V) micro-batch of
logits, only the k largest logits and the log-sum-exp of its rows: the full logits never
leave the device and never exceed one micro-batch. A sequence cut by a shard end is run by
both shards, each keeping its own rows. Resume, checksums, seals and provenance are the
cache writer's, as for every cache.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import CacheWriter, layout, schema, store
from pipeline.cache.sparse import sample_targets, take_values
from pipeline.cache.tokens import TOKENS, token_topk
from pipeline.core import distributed
from pipeline.core.config import PrecomputeConfig, as_dict
from pipeline.core.device import choose_threads, resolve_device, use_threads
from pipeline.core.errors import PipelineError
from pipeline.core.progress import progress
from pipeline.core.runrecord import write_record
from pipeline.data.sequences import POSITION_BITS, SequenceSet, load_sequences
from pipeline.teacher.precompute import open_shared, sparse_shape
from pipeline.teacher.shards import Background, autocast, drain
from pipeline.teacher.teachers import Teacher, load_teacher


def precompute_tokens(
    cfg: PrecomputeConfig, data: str, out: store.Location, overwrite: bool = False
) -> store.Location:
    """Cache the top-`cfg.topk` logits of teacher `cfg.teachers` at every distilled position
    of the sequences `data` (e.g. "pystdlib:train") at `out`; re-running after a crash
    resumes from the finished shards. Under torchrun rank 0 opens the partial cache, every
    rank computes its share of the shards left (k = rank, rank + N, ...) and rank 0 finishes:
    the bytes one process writes."""
    start = time.perf_counter()
    _check_options(cfg)
    ranks = distributed.from_env()  # torchrun's, else one process
    if ranks.active and isinstance(out, str) and out.startswith("memory://"):
        raise PipelineError(f"{out}: memory:// lives in one process; ranks cannot share it")
    seqs = load_sequences(data)
    device = distributed.start(ranks, resolve_device(cfg.device))
    try:
        teacher = load_sequence_teacher(cfg.teachers[0], seqs, device)
        if teacher.module is not None:  # the choose_threads rule, as for every teacher
            use_threads(teacher.module, torch.from_numpy(seqs.tokens[:1]).long(), cfg.threads)
        else:
            torch.set_num_threads(choose_threads(1 << 40, cfg.threads))
        fingerprint = seqs.fingerprint()  # each shard's record: the data it was computed from
        writer = _open_writer(cfg, seqs, data, fingerprint, teacher, out, overwrite, device,
                              ranks)  # fmt: skip
        if writer is None:
            if ranks.main:
                print(f"note: {out}: finished by an interrupted run of this command; now in "
                      "place (nothing recomputed)", file=sys.stderr)  # fmt: skip
            return out
        with writer:
            _compute(cfg, writer, seqs, teacher, device, fingerprint, ranks)
            distributed.barrier(ranks)  # every rank's shards are recorded
            if not ranks.main:
                return out
            writer.reload()
            path = writer.finish(_provenance(cfg, seqs, data, teacher, fingerprint))
        if isinstance(path, Path):
            facts = {"command": "precompute-logits", "ranks": ranks.world,
                     "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
            write_record(path, facts)
        return path
    finally:
        distributed.stop(ranks)


def _compute(cfg, writer, seqs, teacher, device, fingerprint, ranks) -> None:
    """Compute and write this rank's share of the shards left, each written in the
    background while the teacher computes the next."""
    seq, pos = seqs.positions()
    todo = writer.shards_left[ranks.rank :: ranks.world]
    desc = f"precompute (rank {ranks.rank} of {ranks.world})" if ranks.active else "precompute"
    bar = progress(total=writer.num_samples, desc=desc, unit="token",
                   disable=not ranks.main or None)  # fmt: skip
    bar.update(writer.num_samples - sum(writer.shard(k).stop - writer.shard(k).start for k in todo))
    background = Background()
    try:
        for k in todo:
            values = _shard(cfg, writer.shard(k), seq, pos, seqs, teacher, device)
            background.submit(functools.partial(writer.write_shard, k, values, fingerprint))
            bar.update(writer.shard(k).stop - writer.shard(k).start)
    except BaseException:
        drain(background)  # the shards queued are finished work: let them land
        raise
    background.join()
    bar.close()


def _check_options(cfg: PrecomputeConfig) -> None:
    """What a token cache cannot hold yet, refused before anything loads."""
    if not (cfg.topk or cfg.sample_k):
        zero = [f"{cfg.source(k)} 0: " for k in ("topk", "sample_k") if k in cfg._sources]
        raise PipelineError(
            f"{''.join(zero[:1])}a sequence transfer set is cached per token as its top-k "
            "logits (--topk K, K >= 1, e.g. 32) or as K >= 1 classes drawn from it "
            "(--sample-k K): give one"
        )
    if len(cfg.teachers) != 1:
        raise PipelineError("a token cache takes one --teacher (ensembles: not yet)")
    for key, off in (("views", 1), ("features", []), ("keep_members", False)):
        if getattr(cfg, key) != off:
            raise PipelineError(f"{cfg.source(key)}: not available for sequence transfer sets")


def load_sequence_teacher(source: str, seqs: SequenceSet, device) -> Teacher:
    """The teacher `source` on `device`, tried on the first sequences: it must take them
    (context), return (B, L, V) logits, and have a vocabulary that holds the data's tokens."""
    t = load_teacher(source).to(device)
    context = t.input_shape[0] if t.input_shape and len(t.input_shape) == 1 else None
    if context is not None and seqs.context > context:
        raise PipelineError(
            f"--data {seqs.spec}: sequences of up to {seqs.context} tokens, longer than the "
            f"context of --teacher {source} ({context} tokens); cut them shorter"
        )
    if t.num_classes and t.num_classes < seqs.vocab:  # known before running it
        raise PipelineError(
            f"--data {seqs.spec}: a vocabulary of {seqs.vocab} tokens, but --teacher {source} "
            f"predicts {t.num_classes} (another tokenizer?)"
        )
    _same_tokenizer(t, seqs)
    probe = torch.from_numpy(seqs.tokens[:2, : seqs.context]).long().to(device)
    try:
        with torch.inference_mode():
            out = t(probe)
    except Exception as e:  # a foreign model may raise anything
        raise PipelineError(f"--teacher {source} rejected token sequences: {e}") from None
    if out.ndim != 3 or tuple(out.shape[:2]) != tuple(probe.shape):
        raise PipelineError(
            f"--teacher {source}: expected next-token logits (batch, length, vocabulary) for "
            f"token ids {tuple(probe.shape)}, got {tuple(out.shape)}"
        )
    head = int(out.shape[2])
    if seqs.vocab > head:
        raise PipelineError(
            f"--data {seqs.spec}: a vocabulary of {seqs.vocab} tokens, but --teacher {source} "
            f"predicts {head} (another tokenizer?)"
        )
    # The vocabulary rule: logits past the data's own vocabulary are head padding, cut off.
    t.num_classes = seqs.vocab if seqs.vocab_exact else head
    t.head_size = head
    return t


def _same_tokenizer(t: Teacher, seqs: SequenceSet) -> None:
    """Refuse data tokenized otherwise than a Hugging Face teacher's own tokenizer, when its
    directory has one: another token map, or bytes or ids of another vocabulary size (ids of
    an unstated vocabulary, `tokens:` without `vocab=`, are the user's to vouch for)."""
    mine = seqs.tokenizer.get("vocab_sha256")
    own = Path(t.source).expanduser() / "tokenizer.json"
    if t.kind != "hf" or not own.is_file():
        return
    from pipeline.data.text import load_tokenizer, tokenizer_identity

    theirs = tokenizer_identity(load_tokenizer(own, f"--teacher {t.source}"), own.parent)
    if mine is None and seqs.vocab_exact and seqs.vocab != theirs["vocab"]:
        raise PipelineError(
            f"--data {seqs.spec}: {seqs.tokenizer.get('kind', 'ids')} of a vocabulary of "
            f"{seqs.vocab}, but --teacher {t.source} has its own tokenizer of {theirs['vocab']} "
            f"tokens; tokenize with it (jsonl:FILE?tokenizer={t.source})"
        )
    if mine is not None and theirs["vocab_sha256"] != mine:
        raise PipelineError(
            f"--data {seqs.spec}: its tokenizer ({seqs.tokenizer['path']}, "
            f"{seqs.tokenizer['vocab']} tokens) is not --teacher {t.source}'s "
            f"({theirs['vocab']} tokens, another token map); tokenize with the teacher's"
        )


def _open_writer(
    cfg, seqs, data, fingerprint, teacher, out, overwrite, device, ranks
) -> CacheWriter | None:
    """The cache writer, opened (or resumed) by rank 0 and joined by the others once it
    exists; None when a killed run of this command had finished the cache (now in place)."""
    vocab = teacher.num_classes
    dims, attrs = sparse_shape(cfg, vocab, row_seed="(seed, token id)")
    run = {
        "params": _params(cfg),
        "device": torch.device(device).type,
        "torch": torch.__version__,
        "teachers": [{"name": teacher.name, "sha256": teacher.sha256}],
        "data": {"spec": data, "fingerprint": fingerprint},
    }
    make = functools.partial(
        CacheWriter,
        out,
        sample_ids=seqs.token_ids(),
        labels=seqs.next_tokens(),
        num_classes=vocab,
        dims=dims,
        attrs=attrs,
        compression=cfg.compression,
        chunk_rows=cfg.chunk_rows,
        # A row is a token, a few hundred bytes of one forward call's output: shards of 16
        # chunks (up to 262,144 tokens), not the sample caches' 16,384 rows, so zarr's fixed
        # cost per shard and its per-shard writes stay small against the teacher's speed on
        # a GPU, and a shard's 16 chunks are compressed in parallel.
        chunks_per_shard=cfg.chunks_per_shard or layout.MAX_CHUNKS_PER_SHARD,
        fmt=cfg.format,
        overwrite=overwrite,
        run=run,
    )
    return open_shared(make, ranks, device)


def _shard(
    cfg: PrecomputeConfig,
    rows: slice,
    seq: np.ndarray,
    pos: np.ndarray,
    seqs: SequenceSet,
    teacher: Teacher,
    device,
) -> dict[str, np.ndarray]:
    """The top-k nodes of `rows` (distilled positions `seq`[rows], `pos`[rows])."""
    s, p = seq[rows], pos[rows]
    ids = (seqs.sequence_ids[s] << POSITION_BITS) | p  # (S,) each token's row id: its draw's seed
    parts = []
    for first in range(int(s[0]), int(s[-1]) + 1, cfg.batch_size):
        last = min(first + cfg.batch_size, int(s[-1]) + 1)
        length = int(seqs.lengths[first:last].max())
        x = torch.from_numpy(seqs.tokens[first:last, :length]).long().to(device)
        with torch.inference_mode(), autocast(cfg.precision, device):
            logits = teacher(x)[..., : teacher.num_classes]  # (b, L, V): head padding cut
        mine = (s >= first) & (s < last)
        at = torch.from_numpy(s[mine] - first).to(device), torch.from_numpy(p[mine]).to(device)
        part = _targets(cfg, logits[at], ids[mine])  # logits[at]: (n, V)
        if (bad := np.flatnonzero(part.pop("_bad"))).size:
            raise PipelineError(
                f"teacher {teacher.source} produced NaN/Inf logits for tokens "
                f"{ids[mine][bad[:5]].tolist()}"
            )
        parts.append(part)
    nodes = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return {name: a[:, None] for name, a in nodes.items()}  # (S, 1, ...): one view


def _targets(cfg: PrecomputeConfig, logits: torch.Tensor, ids: np.ndarray) -> dict:
    """The sparse nodes of rows `logits` (n, V): top-k, or K classes drawn per token from a
    generator seeded by (seed, token id), as `pipeline.cache.sparse` draws a sample's; and
    under "_bad" (n,) the rows with a NaN or Inf logit. A top-k row's are read off what is
    kept: a NaN or +Inf anywhere makes its log-sum-exp NaN or Inf (a -Inf logit, a token
    the teacher rules out, is kept out of the top-k and adds 0 to it), so no pass over the
    (n, V) logits is made for the check (on an H200 it took a third of a forward's time)."""
    if cfg.topk:
        values, indices, lse = token_topk(logits, cfg.topk)
        bad = ~np.isfinite(lse) | ~np.isfinite(values).all(1)
        return {schema.TOPK_VALUES: values, schema.TOPK_INDICES: indices, schema.TOPK_LSE: lse,
                "_bad": bad}  # fmt: skip
    flat = logits.float().cpu().numpy()
    if (bad := ~np.isfinite(flat).all(1)).any():
        return {"_bad": bad}  # nothing to draw from
    indices, counts = sample_targets(flat, cfg.sample_k, cfg.seed, ids)
    out = {schema.SAMPLE_INDICES: indices, schema.SAMPLE_COUNTS: counts, "_bad": bad}
    if cfg.sample_values:
        out[schema.SAMPLE_VALUES] = take_values(flat, indices)
    return out


def _params(cfg: PrecomputeConfig) -> dict[str, Any]:
    params = as_dict(cfg)
    for key in ("views", "augment", "features", "threads"):
        params.pop(key, None)
    for key, off in (("topk", 0), ("sample_k", 0), ("sample_values", False)):
        if params[key] == off:
            del params[key]
    return params


def _provenance(
    cfg: PrecomputeConfig, seqs: SequenceSet, data: str, teacher: Teacher, fingerprint: str
) -> dict[str, Any]:
    import pipeline

    return {
        "class_names": None,
        "teacher": {
            "members": [teacher.provenance()],
            "combine": "mean-logits",
            "members_kept": False,
        },  # fmt: skip
        "data": {
            "spec": data,
            "source": data.partition(":")[0],
            "split": data.partition(":")[2],
            "fingerprint": fingerprint,
            "fingerprint_scheme": "sequences",
            "input_shape": [seqs.context],
        },
        "params": _params(cfg),
        "created_with": {
            "package": f"kd-pipeline {pipeline.__version__}",
            "torch": torch.__version__,
        },  # fmt: skip
        TOKENS: {
            "position_bits": POSITION_BITS,
            "distil": seqs.distil,
            "num_sequences": len(seqs),
            "vocab": teacher.num_classes,
            "teacher_head": getattr(teacher, "head_size", teacher.num_classes),
            "tokenizer": seqs.tokenizer,
        },
    }
