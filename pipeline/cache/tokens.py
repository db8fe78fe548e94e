"""Token caches: per-token sparse teacher targets of a language model.

A token cache is a top-k cache (`pipeline.cache.sparse`, nodes ``topk/values``,
``topk/indices``, ``topk/lse``) whose rows are distilled token positions rather than samples:
row r is one position of one sequence, its id packs the two (`pipeline.data.sequences`), its
label is the token that follows, and C is the vocabulary V. Only real, distilled tokens are
rows, so nothing on disk is padding, and everything a cache has (chunks, checksums, shards,
seals, resume, torchrun, object storage, provenance) holds per token. The attribute
`TOKENS` says the cache is one and how its rows map to sequences.

Indices are int16 for V <= 32767, else int32: exact for any vocabulary below 2^31.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOKENS = "tokens"  # attribute {"position_bits", "distil", "num_sequences", "tokenizer"}


def token_topk(logits: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest raw logits of each row of (N, V) `logits` (any float dtype, any device),
    their classes and the row's exact log-sum-exp at T = 1, as stored: values (N, k) float32
    largest first, indices (N, k) int16 or int32, lse (N,) float32. Computed in float32 on
    the logits' device: only (N, k) and (N,) come back to the host."""
    import torch

    from pipeline.cache.sparse import index_dtype

    x = logits.float()  # (N, V), a torch tensor

    values, indices = x.topk(k, dim=1)  # (N, k), largest first
    lse = torch.logsumexp(x, dim=1)  # (N,)
    dtype = index_dtype(x.shape[1])
    return (
        values.cpu().numpy(),
        indices.cpu().numpy().astype(dtype),
        lse.cpu().numpy(),
    )


def kept_mass(values: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """The probability at T = 1 the top-k keep of each row: sum(exp(v - lse)).  # (N,)"""
    return np.exp(values.astype(np.float64) - lse.astype(np.float64)[:, None]).sum(1)


def is_token_cache(attrs: dict[str, Any]) -> bool:
    return isinstance(attrs.get(TOKENS), dict)


def require_token_cache(cache: Any, where: Any, seqs: Any) -> None:
    """Refuse an open cache (`cache`, a TeacherCache at `where`) that is unfinished, not a
    token cache, or a token cache of other sequences than `seqs` (a SequenceSet)."""
    from pipeline.core.errors import PipelineError

    cache.require_complete()
    if not is_token_cache(cache.attrs):
        raise PipelineError(f"--cache {where}: not a token cache (its rows are samples)")
    made_with = cache.attrs[TOKENS].get("tokenizer") or {}
    if made_with.get("vocab_sha256") != seqs.tokenizer.get("vocab_sha256"):
        raise PipelineError(
            f"--cache {where} was made with another tokenizer ({_named(made_with)}) than "
            f"--data {seqs.spec} ({_named(seqs.tokenizer)}); give data of the cache's tokenizer"
        )
    if cache.attrs["data"]["fingerprint"] != seqs.fingerprint():
        raise PipelineError(
            f"--cache {where} was built from other sequences ({cache.attrs['data']['spec']}) "
            f"than --data {seqs.spec}; give the data the cache was made with"
        )


def _named(tokenizer: dict[str, Any]) -> str:
    if "vocab_sha256" not in tokenizer:
        return f"{tokenizer.get('kind', 'ids')}"
    return f"{tokenizer.get('path')}, {tokenizer.get('vocab')} tokens"


def token_summary(cache: Any) -> dict[str, Any]:
    """What `pipeline inspect` says of a token cache (`cache`: a TeacherCache): its tokens and
    sequences, and the probability its top-k keep at T = 1, mean and 10th percentile (10% of
    tokens keep less), read shard by shard."""
    from pipeline.cache import schema

    record = cache.attrs[TOKENS]
    n, step = cache.num_samples, int(cache.attrs.get("shard_rows") or cache.num_samples or 1)
    summary = {
        "tokens": n,
        "sequences": record.get("num_sequences"),
        "distil": record.get("distil"),
        "teacher_head": record.get("teacher_head"),
        "tokenizer": _named(record.get("tokenizer") or {}),
    }
    if cache.attrs.get(schema.TARGETS) != "topk":
        return summary  # sampled: what the draws keep is not a mass
    masses = [
        kept_mass(
            np.asarray(cache.read(schema.TOPK_VALUES, slice(a, min(a + step, n))))[:, 0],
            np.asarray(cache.read(schema.TOPK_LSE, slice(a, min(a + step, n))))[:, 0],
        )
        for a in range(0, n, step)
    ]
    mass = np.concatenate(masses) if masses else np.zeros(0)
    return {
        **summary,
        "kept_mass_mean": float(mass.mean()) if n else None,
        "kept_mass_p10": float(np.percentile(mass, 10)) if n else None,
    }
