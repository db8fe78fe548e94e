"""Sparse teacher targets for large label spaces: the top-k logits, or K sampled classes.

A full cache holds C logits per sample (64 KB in float16 at C = 32k). Stage one can keep a few
numbers per sample instead (numpy, `topk_targets` / `sample_targets`); stage two rebuilds a
dense (B, C) target at any temperature T (torch, `topk_logits` / `topk_distribution` /
`sampled_distribution`) and trains from it (`sparse_kd_loss`, or a registered loss fed the
top-k logits). p_T = softmax(t / T) is the teacher's distribution at T; p = p_1. Stage one
imports this module, so it imports nothing of the student side (pipeline.student.losses).

Top-k. Stored per sample: the k largest raw logits v, their classes, and lse, the exact
log-sum-exp of all C logits at T = 1.
  * Exact at T = 1 (up to the rounding of the stored v and lse): every kept probability
    exp(v - lse) and the tail mass m = 1 - sum(exp(v - lse)).
  * Approximated: how m spreads over the C - k tail classes, and so every tail-dependent
    quantity at T != 1. Every tail class gets the one logit that reproduces m at T = 1, the
    log-mean-exp of the true tail logits,
        t_tail = lse + log(m / (C - k)),
    and the target at T is softmax(z / T) of the dense logits z (kept v, tail t_tail). At
    T = 1 that spreads m uniformly. At T != 1 the tail's weight sum(exp(t_i / T)) becomes
    (C - k) exp(t_tail / T): by the power-mean inequality an upper bound for T > 1 (a lower
    bound for T < 1), equal only if the tail logits are equal. So for T > 1 the tail mass is
    overestimated and each kept probability underestimated; ratios among kept classes stay
    exact. With exact v, t_tail <= the smallest kept logit: the argmax is kept. k = C is exact
    at every T. When rounding leaves no tail (m <= 0), m is the smallest normal float32:
    t_tail must stay finite, as a -inf teacher logit gives NaN in kl_div.
  * Store v as float32: float16 rounding (|v| ~ 10: 0.4% per probability) moves m by up to
    4e-3, and m is what the tail at T > 1 is built from (benchmarks/bench_sparse.py).
  * The gradient is biased (Anshumann et al. 2025): the tail's shape is made up.

Sampled (Anshumann et al. 2025, "Sparse logit sampling: accelerating knowledge distillation
in LLMs"). K classes are drawn with replacement from p_Tp (proposal temperature Tp, default 1)
by a generator seeded with (seed, sample id) alone, so a row's draw does not depend on the
batch, the shard or the number of ranks. Stored: the distinct classes and their counts c.
  * At T = Tp: p_hat = c / K is unbiased, E[c_i / K] = p_Tp,i (each draw hits i with
    probability p_Tp,i). The student-dependent part of the KD loss, the cross-entropy
    -sum(p_hat log q) with q = softmax(s / T), is linear in p_hat: its value and its gradient
    T (q - p_hat) / B are unbiased. The other part, the target's entropy (no gradient), is
    not: the empirical entropy is biased low, so the loss value is off by a student-free
    constant. The gradient is noisy (each row's variance ~ 1/K) but right on average.
  * At T != Tp: p_T ~ p^(1/T) needs each drawn class's own logit, which counts alone do not
    give, so `sampled_distribution` refuses without `values` (the raw logits of the stored
    classes, `take_values`). With them: self-normalised importance sampling,
        p_hat_T,i = c_i w_i / sum_j c_j w_j,   w_i = exp(v_i / T - v_i / Tp),
    (the partition functions cancel in the normalisation). Without the normalisation it
    would be unbiased, but that needs sum(exp(t / T)) over all C. As a ratio estimator it is
    biased at finite K (O(1/K)) and consistent as K grows. Classes never drawn get 0 at every
    T: at large T, where p_T spreads over many classes, few draws cover little of it.

Losses (`sparse_support`): kd, soft and ce run from either kind. dkd and dist read the teacher
only through p_T (and its argmax), so they run from the top-k logits with the tail estimate
above; from samples they refuse (not linear in the target). mse refuses both.

Stage two holds a sampled row as `sampled_planes` (its counts, and its logits, spread over the
C classes) and rebuilds the target at the student's T per batch (`planes_distribution`, which
is `sampled_distribution` of the stored row); kd and soft train from it through
`sparse_kd_loss` (their `on_distribution` forms in pipeline.student.losses). `pipeline verify
--teacher` draws a row again from recomputed logits and compares it (`draws_match`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError

KINDS = ("topk", "sampled")
MAX_SAMPLE_K = 65535  # counts are uint16 at most
_TINY = float(np.finfo(np.float32).tiny)  # floor of the tail mass: keeps t_tail finite

_NONLINEAR = (
    "it is not linear in the teacher's distribution, so an estimate from K draws is biased, "
    "and classes never drawn get probability 0"
)
# loss -> kind -> None if it runs from that kind, else why not.
SPARSE_SUPPORT: dict[str, dict[str, str | None]] = {
    "kd": {"topk": None, "sampled": None},
    "soft": {"topk": None, "sampled": None},
    "ce": {"topk": None, "sampled": None},
    "mse": {
        "topk": "it regresses every raw logit; top-k keeps k of them (the rest only as their "
        "log-sum-exp)",
        "sampled": "it regresses every raw logit; sampled targets keep none",
    },
    "dkd": {"topk": None, "sampled": f"its NCKD renormalises the non-target classes: {_NONLINEAR}"},
    "dist": {"topk": None, "sampled": f"Pearson correlation of probabilities: {_NONLINEAR}"},
}


def index_dtype(num_classes: int) -> np.dtype:
    """The class-index dtype: int16 when C <= 32767, else int32."""
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def count_dtype(k: int) -> np.dtype:
    """The dtype of sampled counts (each <= K): uint8 when K <= 255, else uint16."""
    return np.dtype(np.uint8 if k <= np.iinfo(np.uint8).max else np.uint16)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1 or not np.issubdtype(logits.dtype, np.floating):
        raise PipelineError(
            f"sparse targets need (N, C) float logits, got {logits.dtype} {logits.shape}"
        )
    if not np.isfinite(logits).all():
        raise PipelineError("sparse targets need finite logits (found NaN or Inf)")
    return logits


def _check_k(k: int, low: int, high: int, option: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not low <= k <= high:
        raise PipelineError(f"{option} must be an integer in [{low}, {high}], got {k!r}")


def _check_temperature(temperature: float, name: str = "temperature") -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
        raise PipelineError(f"{name} must be a finite number > 0, got {temperature!r}")
    if temperature <= 0:
        raise PipelineError(f"{name} must be > 0, got {temperature!r}")


def log_sum_exp(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of (N, C) logits, computed in float64, as float32 (N,)."""
    x = logits.astype(np.float64)  # (N, C)
    top = x.max(1, keepdims=True)  # (N, 1)
    return (top[:, 0] + np.log(np.exp(x - top).sum(1))).astype(np.float32)


def topk_targets(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest raw logits of each row, their classes, and the row's log-sum-exp.

    logits (N, C) float. Returns values (N, k) float32, largest first (ties: lower class
    first); indices (N, k) int16 if C <= 32767 else int32; lse (N,) float32, the exact
    log-sum-exp of all C logits at T = 1 (computed in float64). Rows are independent.
    """
    logits = _check_logits(logits).astype(np.float32, copy=False)
    n, c = logits.shape
    _check_k(k, 1, c, "--topk")
    kept = np.argpartition(-logits, k - 1, axis=1)[:, :k]  # (N, k), unordered
    kept_values = np.take_along_axis(logits, kept, 1)  # (N, k)
    order = np.lexsort((kept, -kept_values), axis=1)  # by value down, then class up
    indices = np.take_along_axis(kept, order, 1).astype(index_dtype(c))  # (N, k)
    values = np.take_along_axis(kept_values, order, 1)  # (N, k)
    return values, indices, log_sum_exp(logits)


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, np.ndarray) and x.dtype == np.uint16:  # torch reads few uint16 ops
        x = x.astype(np.int32)
    return torch.as_tensor(x, device=device)


def _check_sparse(indices: torch.Tensor, other: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`indices` (B, k) as int64 after checking them against `other` (B, k) and C."""
    if indices.ndim != 2 or indices.shape != other.shape:
        raise PipelineError(
            f"sparse targets: indices {tuple(indices.shape)} and values/counts "
            f"{tuple(other.shape)} must be the same (B, k)"
        )
    if indices.numel() and (indices.min() < 0 or indices.max() >= num_classes):
        raise PipelineError(f"sparse targets: a class index is outside [0, {num_classes})")
    return indices.long()


def _topk_parts(
    values: torch.Tensor | np.ndarray,
    indices: torch.Tensor | np.ndarray,
    lse: torch.Tensor | np.ndarray,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checked top-k parts: values (B, k) float64, indices (B, k) int64, and t_tail (B,)
    float64, the logit every tail class gets (None when k = C: no tail)."""
    values = _as_tensor(values).double()  # (B, k)
    idx = _check_sparse(_as_tensor(indices, values.device), values, num_classes)
    lse = _as_tensor(lse, values.device).double()  # (B,)
    b, k = values.shape
    if k > num_classes or lse.shape != (b,):
        raise PipelineError(f"top-k targets: k = {k} > C = {num_classes} or lse not ({b},)")
    if k == num_classes:
        return values, idx, None
    kept_mass = torch.exp(torch.logsumexp(values - lse[:, None], 1))  # (B,)
    tail_mass = (1.0 - kept_mass).clamp_min(_TINY)  # (B,) exact at T = 1 up to rounding
    return values, idx, lse + torch.log(tail_mass / (num_classes - k))  # log-mean-exp of tail


def topk_logits(
    values: torch.Tensor | np.ndarray,
    indices: torch.Tensor | np.ndarray,
    lse: torch.Tensor | np.ndarray,
    num_classes: int,
) -> torch.Tensor:
    """Dense teacher logits (B, C) float32 from top-k: kept values, every tail class t_tail.

    values (B, k) raw logits, indices (B, k), lse (B,). softmax(z / T) of the result is the
    top-k target at T (see the module docstring), so any loss that reads the teacher only
    through softmax(t / T) takes it in place of the teacher's logits, at every T.
    """
    values, idx, t_tail = _topk_parts(values, indices, lse, num_classes)
    b = len(values)
    dense = torch.empty((b, num_classes), dtype=torch.float32, device=values.device)
    if t_tail is not None:
        dense.copy_(t_tail[:, None].float().expand(b, num_classes))
    return dense.scatter_(1, idx, values.float())  # (B, C)


def topk_distribution(
    values: torch.Tensor | np.ndarray,
    indices: torch.Tensor | np.ndarray,
    lse: torch.Tensor | np.ndarray,
    num_classes: int,
    temperature: float,
) -> torch.Tensor:
    """The top-k target distribution at T, (B, C) float32: softmax(topk_logits(...) / T).

    Exact at T = 1 for the kept classes and the tail's total; the tail is spread uniformly.
    Normalised over k + 1 numbers in float64 (a float32 softmax over C adds ~5e-6 relative).
    """
    _check_temperature(temperature)
    values, idx, t_tail = _topk_parts(values, indices, lse, num_classes)
    scaled = values / temperature  # (B, k)
    b, k = scaled.shape
    dense = torch.zeros((b, num_classes), dtype=torch.float32, device=values.device)
    if t_tail is None:
        log_z = torch.logsumexp(scaled, 1)  # (B,)
    else:
        tail = (t_tail / temperature)[:, None]  # (B, 1) one tail class's scaled logit
        log_z = torch.logsumexp(torch.cat([scaled, tail + math.log(num_classes - k)], 1), 1)
        dense.copy_(torch.exp(tail - log_z[:, None]).float().expand(b, num_classes))
    return dense.scatter_(1, idx, torch.exp(scaled - log_z[:, None]).float())  # (B, C)


def _row_seed(seed: int, sample_id: int) -> np.random.Generator:
    """A row's generator: a function of (seed, sample id) alone (ids may be negative)."""
    return np.random.default_rng([seed, int(sample_id) % (1 << 64)])


def _row_draw(
    logits: np.ndarray, k: int, seed: int, row_id: int, proposal_temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """One row's unnormalised CDF over softmax(logits / Tp), (C,) float64, and where its K
    draws fall on it, (K,): class i is drawn where cdf[i - 1] <= u < cdf[i]."""
    row = np.array(logits, dtype=np.float64) / proposal_temperature  # (C,) fresh copy
    cdf = np.cumsum(np.exp(row - row.max()))  # (C,)
    return cdf, _row_seed(seed, row_id).random(k) * cdf[-1]


def draw_ids(sample_ids: np.ndarray, view_seeds: np.ndarray | None) -> np.ndarray:
    """The id each row's draw is seeded with, row i·V + j for sample i, view j: the sample id
    (one raw view), or the view's seed when views are augmented, so that each view draws
    afresh.  # sample_ids (S,), view_seeds (S, V) | None -> (S·V,)"""
    return np.asarray(sample_ids) if view_seeds is None else np.asarray(view_seeds).reshape(-1)


def sample_targets(
    logits: np.ndarray,
    k: int,
    seed: int,
    ids: np.ndarray,
    *,
    proposal_temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw K classes per row, with replacement, from softmax(logits / Tp).

    logits (N, C) float; ids (N,) int sample ids: row i's draw uses a generator seeded with
    (seed, ids[i]) alone, so it does not depend on the other rows. Returns indices (N, W)
    (int16 if C <= 32767 else int32) and counts (N, W) (uint8 if K <= 255 else uint16), W =
    min(K, C): each row's distinct classes in increasing order, then padding (class 0,
    count 0, which adds nothing). Each row's counts sum to K.
    """
    logits = _check_logits(logits)
    n, c = logits.shape
    _check_k(k, 1, MAX_SAMPLE_K, "--sample-k")
    _check_temperature(proposal_temperature, "the proposal temperature")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PipelineError(f"the sampling seed must be an integer >= 0, got {seed!r}")
    ids = np.asarray(ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise PipelineError(f"sample ids must be ({n},) integers, got {ids.dtype} {ids.shape}")
    width = min(k, c)
    indices = np.zeros((n, width), dtype=index_dtype(c))
    counts = np.zeros((n, width), dtype=count_dtype(k))
    for i in range(n):
        cdf, u = _row_draw(logits[i], k, seed, ids[i], proposal_temperature)
        draws = np.minimum(np.searchsorted(cdf, u, side="right"), c - 1)  # (K,)
        hits = np.bincount(draws, minlength=c)  # (C,) faster than np.unique
        classes = np.flatnonzero(hits)  # (W_i,) increasing
        hits = hits[classes]
        indices[i, : len(classes)] = classes
        counts[i, : len(classes)] = hits
    return indices, counts


def draws_match(
    logits: np.ndarray,
    k: int,
    seed: int,
    ids: np.ndarray,
    indices: np.ndarray,
    counts: np.ndarray,
    *,
    proposal_temperature: float = 1.0,
    slack: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Whether each row's stored draw is the one `sample_targets` makes from `logits`.  # (N,)

    logits (N, C) recomputed; ids (N,) as drawn with; indices, counts (N, W) stored. A row
    matches when its drawn classes, counted, are the draws of `sample_targets`, except that a
    draw within `slack` (N,) of a class boundary, as a fraction of the row's total
    probability, may fall on either side of it: recomputed logits that differ by rounding
    move the boundaries by that much. Sorted, the draws and the stored classes are matched
    one to one (the draw ranges rise with u, so the sorted matching is the only one needed).
    """
    logits = _check_logits(logits)
    n, c = logits.shape
    slack = np.broadcast_to(np.asarray(slack, np.float64), (n,))
    counts = np.asarray(counts).astype(np.int64)  # (N, W)
    ok = np.zeros(n, bool)
    for i in range(n):
        drawn = counts[i] > 0
        got = np.repeat(np.asarray(indices[i])[drawn].astype(np.int64), counts[i][drawn])
        canonical = (np.diff(indices[i][drawn].astype(np.int64)) > 0).all()
        if len(got) != k or not canonical or (counts[i] < 0).any():
            continue
        cdf, u = _row_draw(logits[i], k, seed, ids[i], proposal_temperature)
        u, margin = np.sort(u), slack[i] * cdf[-1]
        lo = np.minimum(np.searchsorted(cdf, u - margin, side="right"), c - 1)  # (K,)
        hi = np.minimum(np.searchsorted(cdf, u + margin, side="right"), c - 1)  # (K,)
        ok[i] = bool(((lo <= got) & (got <= hi)).all())  # got is sorted, as u is
    return ok


def take_values(logits: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The raw logits (N, W) float32 at `indices` (N, W): what sampled targets need at
    T != Tp (padding entries read class 0's logit; their count 0 ignores it)."""
    logits = _check_logits(logits)
    return np.take_along_axis(logits, indices.astype(np.intp), 1).astype(np.float32)


def sampled_distribution(
    indices: torch.Tensor | np.ndarray,
    counts: torch.Tensor | np.ndarray,
    num_classes: int,
    temperature: float,
    *,
    values: torch.Tensor | np.ndarray | None = None,
    proposal_temperature: float = 1.0,
) -> torch.Tensor:
    """The sampled target at T, (B, C) float32; 0 for every class never drawn.

    indices, counts (B, W) from `sample_targets`; values (B, W) the raw logits at `indices`
    (`take_values`), needed only when T != Tp. At T = Tp: counts / K (unbiased). Otherwise
    self-normalised importance weights w = exp(v / T - v / Tp) (biased, consistent).
    """
    _check_temperature(temperature)
    _check_temperature(proposal_temperature, "the proposal temperature")
    counts = _as_tensor(counts).double()  # (B, W)
    idx = _check_sparse(_as_tensor(indices, counts.device), counts, num_classes)
    if (counts < 0).any() or (counts.sum(1) <= 0).any():
        raise PipelineError("sampled targets: counts must be >= 0 with a positive sum per row")
    weights = counts  # (B, W)
    if temperature != proposal_temperature:
        if values is None:
            raise PipelineError(
                f"sampled targets drawn at T = {proposal_temperature:g} cannot give T = "
                f"{temperature:g} from counts alone: they need the drawn classes' logits"
            )
        v = _as_tensor(values, counts.device).double()  # (B, W)
        if v.shape != counts.shape:
            raise PipelineError(f"sampled targets: values {tuple(v.shape)} != counts shape")
        log_w = v / temperature - v / proposal_temperature  # (B, W)
        log_w = log_w.masked_fill(counts == 0, -math.inf)  # padding must not set the max
        weights = counts * torch.exp(log_w - log_w.amax(1, keepdim=True))  # (B, W)
    dense = torch.zeros((len(idx), num_classes), dtype=torch.float64, device=counts.device)
    dense.scatter_add_(1, idx, weights)  # (B, C)
    return (dense / dense.sum(1, keepdim=True)).float()


def sampled_planes(
    indices: np.ndarray, counts: np.ndarray, values: np.ndarray | None, num_classes: int
) -> np.ndarray:
    """Sampled targets spread over the C classes, (B, P, C) float32: plane 0 the counts (0
    for classes never drawn), and with `values` plane 1 the drawn classes' raw logits (0
    elsewhere). How stage two holds sampled rows: one number per class and plane, like the
    logits top-k rebuilds, read by `planes_distribution` at any T.

    indices, counts, values (B, W) as stored (`sample_targets`, `take_values`).
    """
    counts = np.asarray(counts)
    b = len(counts)
    out = np.zeros((b, 1 if values is None else 2, num_classes), np.float32)
    rows, slots = np.nonzero(counts)  # drawn entries; padding has count 0
    classes = np.asarray(indices)[rows, slots].astype(np.intp)
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise PipelineError(f"sparse targets: a class index is outside [0, {num_classes})")
    np.add.at(out, (rows, 0, classes), counts[rows, slots].astype(np.float32))
    if values is not None:
        out[rows, 1, classes] = np.asarray(values)[rows, slots]
    return out


def planes_distribution(
    planes: torch.Tensor, temperature: float, *, proposal_temperature: float = 1.0
) -> torch.Tensor:
    """The sampled target at T, (B, C) float32, from `sampled_planes` (B, P, C): exactly
    `sampled_distribution` of the stored rows (counts / K at T = Tp; with values, the
    self-normalised importance weights)."""
    if planes.ndim != 3 or not 1 <= planes.shape[1] <= 2:
        raise PipelineError(f"sampled planes must be (B, 1 or 2, C), got {tuple(planes.shape)}")
    b, p, c = planes.shape
    classes = torch.arange(c, device=planes.device).expand(b, c)  # (B, C)
    return sampled_distribution(
        classes,
        planes[:, 0],
        c,
        temperature,
        values=planes[:, 1] if p == 2 else None,
        proposal_temperature=proposal_temperature,
    )


def sparse_kd_loss(
    student: torch.Tensor, target: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """T²·KL(target ‖ softmax(s/T)), averaged over the batch: pipeline.student.losses' soft_kl with
    a dense target distribution in place of softmax(t / T).

    student (B, C) raw logits; target (B, C) probabilities at T (`topk_distribution`,
    `sampled_distribution`), zeros allowed. kd is alpha times this plus (1 - alpha) times
    the labelled CE, as in pipeline.student.losses (not imported here: stage one imports this
    module, and the teacher's stages never run the student code).
    """
    _check_temperature(temperature)
    if target.shape != student.shape:
        raise PipelineError(f"target {tuple(target.shape)} != student {tuple(student.shape)}")
    log_q = F.log_softmax(student / temperature, dim=1)  # (B, C)
    target = target.to(log_q.dtype)
    kl = (torch.special.xlogy(target, target) - target * log_q).sum(1).mean()  # 0·log 0 = 0
    return kl * temperature**2


def sparse_support(loss: str, kind: str) -> str | None:
    """None if loss `loss` trains from sparse targets of `kind` ("topk" or "sampled"), else
    the reason it cannot. Top-k feeds `topk_logits` to the registered loss unchanged; sampled
    targets train kd and soft through `sparse_kd_loss`."""
    if kind not in KINDS:
        raise PipelineError(f"unknown sparse target kind '{kind}' (valid: {', '.join(KINDS)})")
    if loss in SPARSE_SUPPORT:
        return SPARSE_SUPPORT[loss][kind]
    return (
        "it is not assessed for sparse targets (pipeline/cache/sparse.py) and may read any raw "
        "logit, while sparse targets keep only some"
    )


def check_sparse_loss(loss: str, kind: str) -> None:
    """Refuse, in one line, a loss that cannot train from sparse targets of `kind`."""
    if (reason := sparse_support(loss, kind)) is not None:
        raise PipelineError(f"loss {loss} cannot train from {kind} targets: {reason}")
