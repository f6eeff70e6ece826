"""The Diagnosing & Re-learning core (Wei et al., ECCV 2024), usable from any training loop.

Pure functions:
    purity_score(labels, clusters)                 majority-label purity of a clustering
    minmax_scale(x)                                per-dimension scaling to [-1, 1]
    kmeans(x, k, n_init=10, max_iter=300, seed=0)  k-means++ and Lloyd in torch, on x's device
    diagnose_purity(features, labels, n_clusters, repeats=1)  scale -> k-means -> purity (mean over
                                                   `repeats` k-means seeds; spread=True: mean and std)
    diagnose_features(train, val, n_clusters)      every modality's purities on both splits and the
                                                   strengths from them: a `Diagnosis` (what the
                                                   Relearner, the trainer's purity tracking and
                                                   imbalance.diagnose_model all use)
    relearn_strength(purity_train, purity_val, lam) tanh(lam * |gap|)
    gap_strengths(purity, lam)                     that strength for every modality at once
    soft_reinit_(module, init_state, alpha)        theta <- alpha * theta_init + (1 - alpha) * theta
and one class, `Relearner`, that snapshots the encoders, decides when to diagnose, applies the
strengths and keeps a record of every diagnosis. Its two rules can be swapped:
`strength(purity) -> {modality: alpha}` sees every modality's purities at once (so a rule may
compare modalities), and `reinit(encoder, init_state, alpha)` may touch only some layers; the
defaults are the paper's (`TanhGap(lam)` and `soft_reinit_`).

The method, in the paper's steps:
  1. snapshot every encoder before the first optimisation step (theta_init);
  2. diagnose each modality k: cluster its pooled features on the training split D and on the
     validation split V, g_k = |purity_k(D) - purity_k(V)|;
  3. re-learn: a_k = tanh(lambda * g_k), every encoder parameter of modality k becomes
     a_k * theta_init + (1 - a_k) * theta_now. Modalities are treated one by one; nothing is
     normalised across them.

Our extension (not in the paper): `repeats` R > 1 runs the k-means with seeds seed, seed + 1, ...,
seed + R - 1 and uses the MEAN purity of each split for the gap and the strength; the record also
carries each purity's std over the seeds and the std of the strength (the rule applied to each
seed's pair of purities). R = 1 (the default) is the published method: one k-means, seed `seed`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "purity_score",
    "minmax_scale",
    "kmeans",
    "diagnose_purity",
    "PurityEstimate",
    "diagnose_features",
    "relearn_strength",
    "gap_strengths",
    "TanhGap",
    "check_lam",
    "diagnosis_epochs",
    "soft_reinit_",
    "snapshot",
    "Diagnosis",
    "Relearner",
    "KMEANS_BACKENDS",
    "check_repeats",
    "FeatureFn",
]

KMEANS_BACKENDS = ("torch", "sklearn")


def _as_int_array(x, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{what} must hold integer ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr


def purity_score(labels, clusters) -> float:
    """Fraction of samples whose label is the majority label of their cluster.

    `labels` and `clusters` are 1-D sequences (list, numpy array or tensor) of integer ids of the
    same length; ids need not be contiguous or start at 0. Ties between majority labels do not
    change the value (every tied label counts the same number of samples).
    """
    y = _as_int_array(labels, "labels")
    c = _as_int_array(clusters, "clusters")
    if y.shape != c.shape:
        raise ValueError(f"labels and clusters differ in length: {y.shape[0]} vs {c.shape[0]}")
    if y.size == 0:
        raise ValueError("purity_score needs at least one sample")
    _, y_idx = np.unique(y, return_inverse=True)
    _, c_idx = np.unique(c, return_inverse=True)
    table = np.zeros((c_idx.max() + 1, y_idx.max() + 1), dtype=np.int64)  # (clusters, labels)
    np.add.at(table, (c_idx, y_idx), 1)
    return float(table.max(axis=1).sum() / y.size)


def minmax_scale(x: Tensor, feature_range: Tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Scale every column of `x` (N, D) to `feature_range`, fitted on `x` itself.

    Matches scikit-learn's MinMaxScaler: a constant column (zero range) maps to the lower end.
    """
    if x.dim() != 2:
        raise ValueError(f"minmax_scale expects a (N, D) matrix, got shape {tuple(x.shape)}")
    lo, hi = feature_range
    if not lo < hi:
        raise ValueError(f"feature_range must be increasing, got {feature_range}")
    x = x if x.is_floating_point() else x.float()
    col_min = x.min(dim=0).values
    span = x.max(dim=0).values - col_min
    span = torch.where(span == 0, torch.ones_like(span), span)
    return (x - col_min) / span * (hi - lo) + lo


def _sq_dist(x: Tensor, x_sq: Tensor, centers: Tensor) -> Tensor:
    """Squared distances of x (N, D) to each run's centers (R, K, D) -> (R, N, K)."""
    r, k, d = centers.shape
    c_sq = (centers * centers).sum(-1)  # (R, K)
    # One (N, D) @ (D, R*K) product for all runs (a batched matmul would copy x once per run).
    cross = (x @ centers.reshape(r * k, d).T).view(-1, r, k).permute(1, 0, 2)  # (N, R*K) -> (R, N, K)
    return (x_sq[None, :, None] - 2.0 * cross + c_sq[:, None, :]).clamp_min_(0.0)


def _centroids(x: Tensor, labels: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Mean of each cluster of each run: labels (R, N) -> centres (R, K, D) (0 for an empty
    cluster) and counts (R, K), with one (R*K, N) @ (N, D) product."""
    r, n = labels.shape
    ids = labels + torch.arange(r, device=labels.device)[:, None] * k  # (R, N) in [0, R*K)
    one_hot = x.new_zeros(n, r * k).scatter_(1, ids.T, 1.0)  # (N, R*K)
    counts = one_hot.sum(0)  # (R*K,)
    sums = one_hot.T @ x  # (R*K, N) @ (N, D) -> (R*K, D)
    return (sums / counts.clamp_min(1)[:, None]).view(r, k, -1), counts.view(r, k)


def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, runs: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (as in scikit-learn: 2 + log(k) candidates per centre), batched
    over `runs` independent restarts. Returns centres (R, K, D)."""
    n, d = x.shape
    trials = 2 + int(math.log(k))
    rows = torch.arange(runs, device=x.device)
    centers = x.new_empty((runs, k, d))
    first = torch.randint(n, (runs,), generator=gen, device=x.device)
    centers[:, 0] = x[first]
    closest = _sq_dist(x, x_sq, centers[:, :1]).squeeze(-1)  # (R, N)
    for j in range(1, k):
        weights = closest.clone()
        # Every point coincides with a centre already: pick uniformly instead of failing.
        weights[weights.sum(1) <= 0] = 1.0
        cand = torch.multinomial(weights, trials, replacement=True, generator=gen)  # (R, T)
        cand_x = x[cand]  # (R, T, D)
        d_cand = torch.minimum(closest[:, :, None], _sq_dist(x, x_sq, cand_x))  # (R, N, T)
        best = d_cand.sum(1).argmin(1)  # (R,)
        centers[:, j] = cand_x[rows, best]
        closest = d_cand[rows, :, best]
    return centers


def kmeans(
    x: Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    seed: int = 0,
    tol: float = 1e-4,
) -> Tensor:
    """k-means++ seeding and Lloyd iterations in torch, on `x`'s device.

    The `n_init` restarts run as one batch (a (n_init, N, k) distance tensor per iteration, one
    matrix product for all of them; a restart whose labels stopped changing leaves the batch), until
    all have converged; the restart with the lowest inertia wins. Deterministic for a given seed
    and device.
    `tol` is relative to the mean per-dimension variance of `x`, as in scikit-learn.
    Returns the cluster id of each row as a LongTensor (N,) on `x`'s device.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects a (N, D) matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= number of samples, got k={k}, N={n}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    x_sq = (x * x).sum(1)  # (N,)
    # A NaN or inf anywhere makes this sum non-finite; only then is every value checked (a sum
    # can also overflow), which saves a pass over x.
    if not torch.isfinite(x_sq.sum()) and not torch.isfinite(x).all():
        raise ValueError("kmeans input holds NaN or infinite values")
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed))
    # Mean per-dimension variance = (mean squared norm - squared norm of the mean) / D, from x_sq
    # and one column sum, in float64 (a column-wise x.var is slow on a CPU).
    mean = x.sum(0).double() / n  # (D,)
    mean_var = max(float(x_sq.sum(dtype=torch.float64)) / n - float((mean * mean).sum()), 0.0) / x.shape[1]
    tol_abs = tol * mean_var

    centers = _kmeans_pp(x, x_sq, k, n_init, gen)  # (R, K, D)
    labels = torch.full((n_init, n), -1, dtype=torch.long, device=x.device)
    active = torch.arange(n_init, device=x.device)  # restarts still iterating
    for _ in range(max_iter):
        current = centers[active]  # (A, K, D)
        dist = _sq_dist(x, x_sq, current)  # (A, N, K)
        new_labels = dist.argmin(-1)  # (A, N)
        new_centers, counts = _centroids(x, new_labels, k)
        empty = counts == 0
        if empty.any():
            # An empty cluster is moved to the points farthest from their centres (as sklearn).
            far_dist = dist.min(-1).values  # (A, N)
            for r in torch.nonzero(empty.any(1)).flatten().tolist():
                slots = torch.nonzero(empty[r]).flatten()
                far = far_dist[r].topk(len(slots)).indices
                new_centers[r, slots] = x[far]
        shift = ((new_centers - current) ** 2).sum((1, 2))  # (A,)
        fixed = (new_labels == labels[active]).all(1)  # (A,): would repeat itself from now on
        centers[active] = new_centers
        labels[active] = new_labels
        # Stop when every restart is at a fixed point or every one still moving moved less than
        # tol (the fixed ones move 0), as one loop over all restarts would; fixed restarts leave
        # the batch, which changes nothing but the work.
        if bool((shift <= tol_abs).all()):
            break
        active = active[~fixed]
        if active.numel() == 0:
            break
    dist = _sq_dist(x, x_sq, centers)
    min_dist, labels = dist.min(-1)  # (R, N)
    best = int(min_dist.sum(1).argmin())
    return labels[best].long()


def _kmeans_sklearn(x: Tensor, k: int, *, n_init, seed: int) -> Tensor:
    """scikit-learn's KMeans (the authors' choice), for reproduction runs."""
    from sklearn.cluster import KMeans

    arr = x.detach().cpu().double().numpy()
    labels = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(arr)
    return torch.from_numpy(labels).long()


@dataclass(frozen=True)
class PurityEstimate:
    """One purity measured with several k-means seeds: `values[r]` used seed `seed + r`."""

    values: Tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (ddof 1); 0.0 for a single seed."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


def check_repeats(repeats: int) -> None:
    """The one check of the number of k-means seeds (the trainer's --diagnosis_repeats)."""
    if not (isinstance(repeats, (int, np.integer)) and repeats >= 1):
        raise ValueError(f"repeats (--diagnosis_repeats) must be an integer >= 1, got {repeats!r}")


def diagnose_purity(
    features: Tensor,
    labels,
    n_clusters: int,
    *,
    seed: int = 0,
    n_init: int = 10,
    backend: str = "torch",
    repeats: int = 1,
    spread: bool = False,
):
    """Purity of k-means clusters (k = `n_clusters`) of `features` (N, D) against `labels` (N,).

    Features are scaled per dimension to [-1, 1] on this matrix alone (paper, step 2), so the
    train and val purities are each measured on their own scale. With `repeats` R the k-means runs
    with seeds seed, ..., seed + R - 1 on the same scaled features. Returns the mean purity (a
    float; for R = 1 the one purity, as published), or with `spread=True` a `PurityEstimate`
    (every seed's purity, their mean and std).
    """
    check_repeats(repeats)
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {KMEANS_BACKENDS}")
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    y = _as_int_array(labels, "labels")
    if y.shape[0] != features.shape[0]:
        raise ValueError(
            f"features and labels differ in length: {features.shape[0]} vs {y.shape[0]}"
        )
    scaled = minmax_scale(features.detach().float())
    values = []
    for r in range(repeats):
        if backend == "torch":
            clusters = kmeans(scaled, n_clusters, n_init=n_init, seed=seed + r)
        else:
            clusters = _kmeans_sklearn(scaled, n_clusters, n_init=n_init, seed=seed + r)
        values.append(purity_score(y, clusters.cpu()))
    estimate = PurityEstimate(tuple(values))
    return estimate if spread else estimate.mean


def check_lam(lam: float) -> None:
    """The one check of lambda (the trainer's --move_lambda)."""
    if not lam >= 0:
        raise ValueError(f"lam (--move_lambda) must be >= 0, got {lam}")


def relearn_strength(purity_train: float, purity_val: float, lam: float) -> float:
    """Re-learning strength a = tanh(lam * |purity_train - purity_val|), in [0, 1)."""
    for name, p in (("purity_train", purity_train), ("purity_val", purity_val)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    check_lam(lam)
    return math.tanh(lam * abs(float(purity_train) - float(purity_val)))


Purities = Mapping[str, Mapping[str, float]]  # modality -> {"train": p, "val": p}


def gap_strengths(purity: Purities, lam: float) -> Dict[str, float]:
    """The paper's rule for every modality: a_k = tanh(lam * |P_k(D) - P_k(V)|), each modality on
    its own (nothing is normalised across modalities)."""
    return {m: relearn_strength(p["train"], p["val"], lam) for m, p in purity.items()}


@dataclass(frozen=True)
class TanhGap:
    """The default strength rule of `Relearner`: `gap_strengths` with a fixed lambda."""

    lam: float = 3.0

    def __post_init__(self):
        check_lam(self.lam)

    def __call__(self, purity: Purities) -> Dict[str, float]:
        return gap_strengths(purity, self.lam)


def snapshot(module: nn.Module, *, buffers: bool = False) -> Dict[str, Tensor]:
    """A detached copy of a module's parameters (and floating buffers if asked), by name."""
    state = {name: p.detach().clone() for name, p in module.named_parameters()}
    if buffers:
        for name, b in module.named_buffers():
            if b.is_floating_point():
                state[name] = b.detach().clone()
    return state


@torch.no_grad()
def soft_reinit_(
    module: nn.Module, init_state: Mapping[str, Tensor], alpha: float, *, buffers: bool = False
) -> None:
    """In place: every parameter becomes alpha * init + (1 - alpha) * current.

    BatchNorm running statistics and other buffers are left alone unless `buffers=True` (then
    floating buffers are interpolated the same way; integer counters never are). Optimiser state
    is not touched: the parameters stay the same objects.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    tensors = list(module.named_parameters())
    if buffers:
        tensors += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    for name, current in tensors:
        if name not in init_state:
            raise KeyError(f"init_state has no entry for {name!r}; was it snapshotted from this module?")
        init = init_state[name]
        if init.shape != current.shape:
            raise ValueError(
                f"init_state[{name!r}] has shape {tuple(init.shape)}, the module {tuple(current.shape)}"
            )
        current.mul_(1.0 - alpha).add_(init.to(device=current.device, dtype=current.dtype) * alpha)


@dataclass
class Diagnosis:
    """What one diagnosis measured and did. Epochs are 0-based, as in the trainer's log."""

    epoch: int
    purity: Dict[str, Dict[str, float]]  # modality -> {"train": p, "val": p}
    gap: Dict[str, float]
    alpha: Dict[str, float]
    applied: bool = True
    seconds: float = 0.0
    # With repeats R > 1 (our extension): purity and alpha above are from the mean purities over R
    # k-means seeds; these are the stds over the seeds. None for R = 1 (nothing to measure a spread on).
    repeats: int = 1
    purity_std: Optional[Dict[str, Dict[str, float]]] = None  # modality -> {"train": s, "val": s}
    alpha_std: Optional[Dict[str, float]] = None

    def to_dict(self) -> dict:
        """A JSON-ready dict; with R = 1 exactly the keys of the published method's record (no
        repeats, no stds), so such records read as they always did."""
        d = asdict(self)
        if self.repeats == 1:
            for key in ("repeats", "purity_std", "alpha_std"):
                d.pop(key)
        return d

    def summary(self, what: str = "diagnosis") -> str:
        """A few lines for a log: purity per modality and split, gap and strength (± std over the
        k-means seeds when there are several); `what` names the record in the first line."""
        def pm(value: float, std: Optional[float]) -> str:
            return f"{value:.3f}" if std is None else f"{value:.3f}±{std:.3f}"

        seeds = f", mean of {self.repeats} k-means seeds" if self.repeats > 1 else ""
        rows = [f"  {what} after epoch {self.epoch} ({'applied' if self.applied else 'recorded only'}, "
                f"{self.seconds:.1f}s{seeds}):"]
        for m, p in self.purity.items():
            s = (self.purity_std or {}).get(m, {})
            rows.append(f"    {m:>10}: purity train {pm(p['train'], s.get('train'))} val {pm(p['val'], s.get('val'))}  "
                        f"gap {self.gap[m]:.3f}  strength {pm(self.alpha[m], (self.alpha_std or {}).get(m))}")
        return "\n".join(rows)


def diagnose_features(
    train: Tuple[Mapping[str, Tensor], Tensor],
    val: Tuple[Mapping[str, Tensor], Tensor],
    n_clusters: int,
    *,
    strength: Optional[Callable[[Purities], Dict[str, float]]] = None,
    modalities: Optional[Sequence[str]] = None,
    seed: int = 0,
    n_init: int = 10,
    backend: str = "torch",
    repeats: int = 1,
    lam: float = 3.0,
    epoch: int = -1,
) -> Diagnosis:
    """Diagnose every modality from its pooled features: `train` and `val` are ({modality: (N, D)},
    labels (N,)). Purities per modality and split (`diagnose_purity`, mean over `repeats` seeds),
    then the strengths from all of them at once (`strength`, default `TanhGap(lam)`, the paper's).
    Changes nothing (applied=False).

    With R > 1 the strengths come from the mean purities, and `alpha_std` is the std over the seeds
    of the rule applied to seed r's train and val purities (so the rule is called R + 1 times)."""
    start = time.perf_counter()
    check_repeats(repeats)
    rule = strength if strength is not None else TanhGap(lam)
    modalities = list(train[0]) if modalities is None else list(modalities)
    estimates: Dict[str, Dict[str, PurityEstimate]] = {}
    for m in modalities:
        per_split = {}
        for split, (feats, labels) in (("train", train), ("val", val)):
            if m not in feats:
                raise KeyError(f"extract({split!r}) returned no features for modality {m!r} (got {sorted(feats)})")
            per_split[split] = diagnose_purity(feats[m], labels, n_clusters, seed=seed, n_init=n_init,
                                               backend=backend, repeats=repeats, spread=True)
        estimates[m] = per_split
    purity = {m: {s: e.mean for s, e in p.items()} for m, p in estimates.items()}
    alpha = {m: float(a) for m, a in rule(purity).items()}
    if set(alpha) != set(purity):
        raise KeyError(f"the strength rule returned strengths for {sorted(alpha)}, expected "
                       f"every modality {sorted(purity)}")
    purity_std = alpha_std = None
    if repeats > 1:
        purity_std = {m: {s: e.std for s, e in p.items()} for m, p in estimates.items()}
        per_seed = [rule({m: {s: e.values[r] for s, e in p.items()} for m, p in estimates.items()})
                    for r in range(repeats)]
        alpha_std = {m: float(np.std([float(a[m]) for a in per_seed], ddof=1)) for m in alpha}
    return Diagnosis(
        epoch=epoch,
        purity=purity,
        gap={m: abs(p["train"] - p["val"]) for m, p in purity.items()},
        alpha=alpha,
        applied=False,
        seconds=time.perf_counter() - start,
        repeats=repeats,
        purity_std=purity_std,
        alpha_std=alpha_std,
    )


def diagnosis_epochs(epochs: int, reinit_epoch: int, reinit_num: int) -> list:
    """The 0-based epochs after which a run of `epochs` epochs diagnoses (`Relearner.due`): every
    e > 0 with e % reinit_epoch == 0, at most reinit_num of them; none when either is 0."""
    if reinit_epoch <= 0 or reinit_num <= 0:
        return []
    return list(range(reinit_epoch, epochs, reinit_epoch))[:reinit_num]


StrengthRule = Callable[[Purities], Dict[str, float]]
ReinitRule = Callable[..., None]  # (encoder, init_state, alpha, *, buffers) -> None, in place


FeatureFn = Callable[[str], Tuple[Mapping[str, Tensor], Tensor]]


@dataclass
class Relearner:
    """Diagnosing & Re-learning for any model with one encoder module per modality.

    Create it before the first optimisation step (it snapshots the encoders then). After each
    epoch call `step(epoch, extract)`, where `extract(split)` returns, for split "train" and
    "val", a dict modality -> pooled features (N, D) and the labels (N,). It diagnoses when
    `epoch > 0 and epoch % reinit_epoch == 0` (0-based epochs, as in the authors' code, so with
    the defaults after the 21st, 41st and 61st epochs), at most `reinit_num` times.

        relearner = Relearner(model.encoders, n_clusters=6, lam=3.0)
        for epoch in range(epochs):
            train_one_epoch(...)
            record = relearner.step(epoch, extract)   # None when no diagnosis is due

    The rules are arguments: `strength(purity) -> {modality: alpha}` gets every modality's train
    and val purities at once (default `TanhGap(lam)`, the paper's), and `reinit(encoder,
    init_state, alpha, buffers=...)` moves one encoder in place (default `soft_reinit_`, every
    parameter). E.g. a strength relative to the other modalities, or a re-init of the last
    stage only, is one function passed here. `repeats` (keyword only; default 1, the paper's):
    the k-means seeds per purity, see `diagnose_features`.
    """

    encoders: Mapping[str, nn.Module]
    n_clusters: int
    lam: float = 3.0
    reinit_epoch: int = 20
    reinit_num: int = 3
    seed: int = 0
    n_init: int = 10
    kmeans_backend: str = "torch"
    reinit_buffers: bool = False
    apply: bool = True  # False: diagnose and record only (a "diagnose-only" ablation)
    strength: Optional[StrengthRule] = None  # None: TanhGap(lam)
    reinit: ReinitRule = soft_reinit_
    init_states: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)
    num_reinits: int = 0
    history: list = field(default_factory=list)
    repeats: int = field(default=1, kw_only=True)  # keyword only: positional calls stay as they were

    def __post_init__(self):
        if not self.encoders:
            raise ValueError("Relearner needs at least one encoder")
        if self.n_clusters < 2:
            raise ValueError(f"n_clusters must be >= 2, got {self.n_clusters}")
        if self.kmeans_backend not in KMEANS_BACKENDS:
            raise ValueError(
                f"unknown kmeans_backend {self.kmeans_backend!r}; choose one of {KMEANS_BACKENDS}"
            )
        check_repeats(self.repeats)
        if self.strength is None:
            self.strength = TanhGap(self.lam)  # checks lam
        self.encoders = dict(self.encoders)
        if not self.init_states:
            self.init_states = {
                m: snapshot(enc, buffers=self.reinit_buffers) for m, enc in self.encoders.items()
            }

    @property
    def modalities(self) -> Sequence[str]:
        return list(self.encoders)

    def due(self, epoch: int) -> bool:
        """Whether a diagnosis follows 0-based `epoch`."""
        return (
            self.reinit_epoch > 0
            and epoch > 0
            and epoch % self.reinit_epoch == 0
            and self.num_reinits < self.reinit_num
        )

    def diagnose(
        self,
        train: Tuple[Mapping[str, Tensor], Tensor],
        val: Tuple[Mapping[str, Tensor], Tensor],
        epoch: int = -1,
    ) -> Diagnosis:
        """Purities of every modality on both splits, then the strengths from all of them
        (`diagnose_features` with this Relearner's settings). Changes nothing."""
        return diagnose_features(train, val, self.n_clusters, strength=self.strength, modalities=self.modalities,
                                 seed=self.seed, n_init=self.n_init, backend=self.kmeans_backend,
                                 repeats=self.repeats, epoch=epoch)

    def relearn(self, diagnosis: Diagnosis) -> None:
        """Re-initialise every encoder with its own strength (the `reinit` rule)."""
        for m, enc in self.encoders.items():
            self.reinit(enc, self.init_states[m], diagnosis.alpha[m], buffers=self.reinit_buffers)
        diagnosis.applied = True

    def step(self, epoch: int, extract: FeatureFn, *, compute: bool = True,
             share: Optional[Callable[[Optional[Diagnosis]], Diagnosis]] = None) -> Optional[Diagnosis]:
        """Diagnose and re-learn if due after `epoch`; returns the record, or None.

        With several processes: every process calls `extract` (a collective gather), the one with
        `compute=True` clusters, and `share` hands its record to all (e.g. a broadcast), so every
        replica applies the same strengths and stays identical."""
        if not self.due(epoch):
            return None
        start = time.perf_counter()
        train, val = extract("train"), extract("val")
        diagnosis = self.diagnose(train, val, epoch) if compute else None
        if share is not None:
            diagnosis = share(diagnosis)
        if self.apply:
            self.relearn(diagnosis)
        diagnosis.seconds = time.perf_counter() - start
        self.num_reinits += 1
        self.history.append(diagnosis)
        return diagnosis

    def state_dict(self) -> dict:
        return {
            "init_states": self.init_states,
            "num_reinits": self.num_reinits,
            "history": [d.to_dict() for d in self.history],
        }

    def load_state_dict(self, state: Mapping) -> None:
        missing = set(self.encoders) - set(state["init_states"])
        if missing:
            raise KeyError(f"saved D&R state lacks init snapshots for modalities {sorted(missing)}")
        self.init_states = {m: dict(state["init_states"][m]) for m in self.encoders}
        self.num_reinits = int(state["num_reinits"])
        self.history = [Diagnosis(**d) for d in state["history"]]
