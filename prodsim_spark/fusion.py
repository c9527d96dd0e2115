"""Fused similarity and IVF blocking: pure numpy, no Spark (the join stage runs these inside tasks).

Fused score of a pair (q, m)::

    score = sum_c w_c * a_c(q, m) * sim_c(q, m) / sum_c w_c * a_c(q, m)

over the components c = text, image, lexical (cosine of L2-normalised vectors), brand, category (1 if
equal, else 0) and price (exp(-|log p_q - log p_m| / price_scale)), where a_c is 1 when both
products have component c. Renormalising over the components both products have keeps scores of
text-only, image-only and full products on one scale.

Content first: a pair is compared only when the two products share a *content* component (text,
image or lexical; see :func:`shared_content`). Brand, category and price say how alike two products
are that already look or read alike; on their own they would rank any two products of one price as
near-twins (renormalised over the price term alone, a text-only apple listing and a photo-only
pepper listing of the same price scored 0.92). Such pairs score NaN: never listed. Only when no
content component has a weight do the attributes stand alone. When two products come from the same source
(feed, seller) of a catalog with several, ``same_source_penalty`` is subtracted (see
``JoinSettings.same_source_penalty``). Each component's *contribution* ``w_c * a_c * sim_c / sum w a``
is reported, and the penalty as the part ``same_source``; the parts add up to the score.

For blocking, the dense modalities are folded into one vector ``[sqrt(w_t) t, sqrt(w_i) i, sqrt(w_l) l]``
(unit-normalised): for two products with the same modalities its dot product is exactly their
dense fused score, so the IVF cells and probes rank candidates by the real score; the structured
terms and the renormalisation are then applied exactly to every candidate pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prodsim_spark.config import FusionWeights

DENSE = ("text", "image", "lexical")  # vector modalities: cosine similarity
COMPONENTS = DENSE + ("brand", "category", "price")  # weighted components of the fused score
PARTS = COMPONENTS + ("same_source",)  # what a score is the sum of: contributions, then the penalty (<= 0)


@dataclass
class Products:
    """One block of products as arrays; missing values: zero rows + has False, code -1, NaN price."""

    ids: np.ndarray                  # (n,) object (product_id strings)
    vectors: dict[str, np.ndarray]   # modality -> (n, d) float32, unit rows or zeros; absent: not used
    has: dict[str, np.ndarray]       # modality -> (n,) bool
    brand: np.ndarray                # (n,) int64 code, -1 missing
    category: np.ndarray             # (n,) int64 code, -1 missing
    log_price: np.ndarray            # (n,) float64, NaN missing
    source: np.ndarray               # (n,) int64 code, -1 missing

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx) -> "Products":
        return Products(self.ids[idx], {k: v[idx] for k, v in self.vectors.items()},
                        {k: v[idx] for k, v in self.has.items()}, self.brand[idx], self.category[idx],
                        self.log_price[idx], self.source[idx])


def stack_vectors(values, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of arrays (None for missing) -> (n, dim) float32 matrix with zero rows, and a mask.
    Vectors are L2-normalised here again, so callers may pass unnormalised embeddings."""
    n = len(values)
    out = np.zeros((n, dim), dtype=np.float32)
    has = np.zeros(n, dtype=bool)
    if dim:
        has[:] = [v is not None and len(v) == dim for v in values]
        if has.any():  # one C-level stack, not a Python loop of row copies
            out[has] = np.stack([values[i] for i in np.flatnonzero(has)])
    return unit_rows(out, has)


def unit_rows(out: np.ndarray, has: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length in place; a zero row counts as missing."""
    norms = np.linalg.norm(out, axis=1)
    has &= norms > 0
    out[has] /= norms[has, None]
    return out, has


ATTRIBUTES = {"brand": "brand", "category": "category", "price": "log_price"}  # component -> Products field


def attribute_similarity(name: str, a: np.ndarray, b: np.ndarray, price_scale: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, availability) of a structured component, elementwise over ``a`` and ``b``
    broadcast (row-aligned pairs, or a[:, None] against b[None, :] for every pair): brand and category
    codes agree (1/0, code -1 = missing); price proximity on log-price (NaN = missing)."""
    if name == "price":
        diff = np.abs(a - b)
        return np.exp(-np.nan_to_num(diff, nan=0.0) / price_scale), ~np.isnan(diff)
    return (a == b).astype(np.float32), (a >= 0) & (b >= 0)


def same_source(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise (broadcast like attribute_similarity): both sources known (code >= 0) and equal."""
    return (a == b) & (a >= 0)


def shared_content(avail: dict[str, np.ndarray]) -> np.ndarray | None:
    """Where a pair shares a content component (any of DENSE in ``avail``), or None when no content
    component is in play at all (then the attributes are all there is to compare)."""
    content = [avail[name] for name in DENSE if name in avail]
    return np.logical_or.reduce(content) if content else None


def pair_scores(q: Products, m: Products, weights: FusionWeights, *, price_scale: float,
                same_source_penalty: float = 0.0, pair_weights: dict[str, np.ndarray] | None = None,
                missing_share: float = 0.0, paired: bool = False):
    """(score, parts) for every pair: (|q|, |m|) matrices, parts by name (see PARTS; only those in
    play); score is NaN where the pair shares no content component (see module docstring).
    ``paired``: ``q`` and ``m`` are row-aligned (|q| == |m|) and the result is one score per aligned
    pair, (|q|,) float32 vectors: each pair's score then does not depend on the batch it was scored in
    (see :func:`exact_top_k`), where a float32 matrix product's does in its last bits.
    ``pair_weights``: component -> (|q|, |m|) factors in [0, 1] on that component's weight, pair by pair
    (the group stage's text specificity); the renormalisation then shifts the weight to the others.
    ``missing_share``: the share of a content component's weight that still counts, as similarity 0,
    where ``q`` has the component and ``m`` does not (search: a product without a photo cannot match
    the query's photo); 0, the join's rule, renormalises over what both have."""
    weights = weights.as_dict()
    if paired:
        if len(q) != len(m):
            raise ValueError(f"paired scores need row-aligned products, got {len(q)} and {len(m)}")
        dtype, shape = np.float64, (len(q),)
        left = right = lambda a: a  # noqa: E731
        # a row-wise dot product: each pair's sum runs over its own two rows in one fixed order (unlike a
        # matrix product's, whose kernel and blocking follow the batch's shape); float32 sums, 3x faster
        # than float64 ones, err ~1e-6, far below what ranks two different products
        dot = lambda a, b: np.einsum("ij,ij->i", a, b).astype(np.float64)  # noqa: E731
    else:
        dtype, shape = np.float32, (len(q), len(m))
        left, right = (lambda a: a[:, None]), (lambda b: b[None, :])
        dot = lambda a, b: a @ b.T  # noqa: E731
    sims, avail = {}, {}
    for name in DENSE:
        if weights[name] > 0 and name in q.vectors and q.vectors[name].shape[1]:
            sims[name] = dot(q.vectors[name], m.vectors[name])
            avail[name] = left(q.has[name]) & right(m.has[name])
    for name, field in ATTRIBUTES.items():
        if weights[name] > 0:
            sim, avail[name] = attribute_similarity(name, left(getattr(q, field)), right(getattr(m, field)),
                                                    price_scale)
            sims[name] = sim.astype(dtype)
    pair_weights = pair_weights or {}
    effective = {name: weights[name] * avail[name] * pair_weights.get(name, 1) for name in sims}
    total = np.zeros(shape, dtype=dtype)
    for name in sims:
        total += effective[name]
        if missing_share > 0 and name in DENSE:
            total += weights[name] * missing_share * (left(q.has[name]) & right(~m.has[name]))
    comparable = total > 0
    content = shared_content(avail)
    if content is not None:
        comparable &= content
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(comparable, 1.0 / total, np.nan).astype(dtype)
    contributions = {name: (effective[name] * sims[name] * inv).astype(dtype) for name in sims}
    if same_source_penalty > 0:
        contributions["same_source"] = np.where(same_source(left(q.source), right(m.source)),
                                                dtype(-same_source_penalty), dtype(0))
    score = np.zeros(shape, dtype=dtype)
    for c in contributions.values():
        score += c
    if paired:
        return score.astype(np.float32), {name: c.astype(np.float32) for name, c in contributions.items()}
    return score, contributions


def id_rank(ids: np.ndarray) -> np.ndarray:
    """Each id's position in id order (ascending strings), as ints: the tie-break of every ranking."""
    return np.argsort(np.argsort(ids.astype(str), kind="stable"), kind="stable")


def top_k(score: np.ndarray, q_ids: np.ndarray, m_ids: np.ndarray, k: int, *, slack: float = 0.0,
          member_rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per query row its k best members: self excluded, NaN skipped, ties broken by member id
    (ascending) so the result never depends on row order. With ``slack`` > 0, a row whose k-th best
    score has further members within ``slack`` below it keeps all of them (more than k): a shortlist
    that :func:`exact_top_k` re-scores and cuts.

    Returns (rows, cols) index arrays, grouped by row and sorted best first within a row.
    Vectorised; rows with a tie at the k-th place take an exact per-row path.
    """
    import pandas as pd

    s = np.where(np.isnan(score), -np.inf, score).astype(np.float32)
    self_col = pd.Index(m_ids).get_indexer(q_ids)  # where a query is also a member: never its own neighbour
    has_self = self_col >= 0
    s[np.flatnonzero(has_self), self_col[has_self]] = -np.inf
    n_q, n_m = s.shape
    if n_q == 0 or n_m == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    kk = min(k, n_m)
    part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < n_m else np.tile(np.arange(n_m), (n_q, 1))
    vals = np.take_along_axis(s, part, axis=1)
    kth = vals.min(axis=1)
    tied = ((s >= (kth - slack)[:, None]).sum(axis=1) > kk) & np.isfinite(kth)
    member_rank = id_rank(m_ids) if member_rank is None else member_rank
    order = np.lexsort((member_rank[part], -vals), axis=1)
    part = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    keep = ~tied[:, None] & np.isfinite(vals)  # untied rows: the partition is the answer
    rows_out = [np.nonzero(keep)[0]]
    cols_out = [part[keep]]
    for r in np.flatnonzero(tied):  # exact path: every candidate at or above the k-th value, by (score, id)
        idx = np.flatnonzero(s[r] >= kth[r] - slack)
        idx = idx[np.lexsort((member_rank[idx], -s[r, idx]))]
        idx = idx if slack > 0 else idx[:kk]
        rows_out.append(np.full(len(idx), r))
        cols_out.append(idx)
    rows, cols = np.concatenate(rows_out), np.concatenate(cols_out)
    order = np.argsort(rows, kind="stable")  # group by row, keeping each row's best-first order
    return rows[order], cols[order]


# float32 matrix products of unit vectors err by ~1e-6: every member within this of a row's k-th
# best float32 score is re-scored exactly before the cut
RESCORE_SLACK = 1e-4


def exact_top_k(score: np.ndarray, q: Products, m: Products, k: int, scorer, *, q_ids: np.ndarray | None = None,
                chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Each query row's k best members of ``m``, ranked by exact per-pair scores: (rows, cols, score,
    parts), grouped by row, best first, ties by member id.

    ``score``: the float32 (|q|, |m|) fused scores (NaN: never listed) that pick a shortlist (see
    :func:`top_k`'s ``slack``); ``scorer``: :func:`pair_scores` with the caller's settings (a
    ``functools.partial``), which made ``score`` and is called here with ``paired=True``. Why: a float32 matrix product's value for one pair depends in its
    last bits on the shape of the batch (BLAS picks kernels by shape), so copies of one listing scored
    in different batches (a cell of the full join, an incremental scan, a search batch) could trade
    places between runs. A pair's exact score does not depend on its batch, so the lists are the same
    however the work was cut. ``q_ids``: ids to exclude as self (default ``q.ids``)."""
    rank = id_rank(m.ids)
    rows, cols = top_k(score, q.ids if q_ids is None else q_ids, m.ids, k, slack=RESCORE_SLACK, member_rank=rank)
    scored, parts = [], {}
    for start in range(0, len(rows), chunk):  # bounded memory: the pairs' vectors are gathered per chunk
        s, p = scorer(q.take(rows[start:start + chunk]), m.take(cols[start:start + chunk]), paired=True)
        scored.append(s)
        for name, v in p.items():
            parts.setdefault(name, []).append(v)
    exact = np.concatenate(scored) if scored else np.zeros(0, np.float32)
    order = np.lexsort((rank[cols], -exact, rows))
    rows, cols, exact = rows[order], cols[order], exact[order]
    keep = np.arange(len(rows)) - np.searchsorted(rows, rows) < k  # each row's first k
    return (rows[keep], cols[keep], exact[keep],
            {name: np.concatenate(v)[order][keep] for name, v in parts.items()})


def fused_dense(p: Products, weights: FusionWeights) -> np.ndarray:
    """The blocking vector [sqrt(w_t) t, sqrt(w_i) i, sqrt(w_l) l], unit-normalised (zero for products
    with none of them)."""
    w = weights.as_dict()
    parts = [np.sqrt(w[name]) * p.vectors[name] * p.has[name][:, None]
             for name in DENSE if w[name] > 0 and name in p.vectors and p.vectors[name].shape[1]]
    v = np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(p), 1), np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


# --------------------------------------------------------------------------------------------
# IVF centroids


SEED_ROUNDS = 64  # k-means++ seeds are drawn in at most this many rounds (see kmeans)


def kmeans(x: np.ndarray, k: int, *, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means (cosine) with k-means++ seeding; returns (k, d) unit centroids.

    Seeds are drawn ``ceil(k / SEED_ROUNDS)`` at a time (k-means|| style): one seed per pass over the
    sample would cost k passes, minutes for thousands of cells on a sample of 100k+ products, where a
    batch of seeds per pass is one matrix product. Up to SEED_ROUNDS cells it is plain k-means++."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    per_round = -(-k // SEED_ROUNDS)
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(n)]
    closest = 1 - x @ centroids[0]
    j = 1
    while j < k:  # k-means++: far points are likelier seeds
        p = np.clip(closest, 0, None) ** 2
        p = p / p.sum() if p.sum() > 0 else None
        if per_round == 1:
            picks = [rng.choice(n, p=p)]
        else:
            m = min(per_round, k - j, int(np.count_nonzero(p)) if p is not None else n)
            picks = rng.choice(n, size=max(1, m), replace=False, p=p)
        centroids[j:j + len(picks)] = x[picks]
        closest = np.minimum(closest, 1 - (x @ centroids[j:j + len(picks)].T).max(axis=1))
        j += len(picks)
    for _ in range(iterations):
        centroids = update_centroids(centroids, cell_sums(x, centroids))
    return centroids.astype(np.float32)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, chunk_scores: int = 50_000_000) -> np.ndarray:
    """Each row's most similar centroid, in row chunks of at most ``chunk_scores`` scores (a 200k-row
    sample against 4,000 centroids would be a 3 GB matrix at once)."""
    step = max(1, chunk_scores // max(1, len(centroids)))
    return np.concatenate([np.argmax(x[s:s + step] @ centroids.T, axis=1) for s in range(0, len(x), step)]
                          ) if len(x) else np.zeros(0, dtype=np.int64)


def rows_by_cell(cells: np.ndarray, n_cells: int) -> list[np.ndarray]:
    """For each cell, the rows that have it among theirs (``cells``: (rows, c) cell indices, each row's
    cells distinct), in row order: one sort, not a pass over the rows per cell."""
    flat = cells.reshape(-1)
    order = np.argsort(flat, kind="stable")
    return np.split(order // cells.shape[1], np.searchsorted(flat[order], np.arange(1, n_cells)))


def cell_sums(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(k, d) float64 sums of the rows of x by nearest centroid: one Lloyd step's statistics, which
    add up across partitions (so Spark tasks can compute them on their share of the data)."""
    sums = np.zeros(centroids.shape, dtype=np.float64)
    if len(x):
        assign = nearest_centroid(x, centroids)
        order = np.argsort(assign, kind="stable")  # per-cell sums by reduceat: np.add.at is ~50x slower
        present, starts = np.unique(assign[order], return_index=True)
        sums[present] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    return sums


def update_centroids(centroids: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Spherical k-means update: each centroid becomes its members' normalised mean (empty cells stay)."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 0, sums / np.where(norms == 0, 1, norms), centroids).astype(np.float32)


def train_cells(sample: np.ndarray, n_total: int, *, block_size: int, max_block_size: int,
                iterations: int, seed: int, max_cells: int | None = None) -> np.ndarray:
    """Centroids such that no cell is expected to hold more than max_block_size products.

    k = n_total / block_size cells from a k-means on the sample; a cell whose share of the sample
    predicts more than max_block_size products (a skewed catalog) is split by a k-means of its own
    members, so one dense region cannot make one giant block that stalls a task. With ``max_cells``
    (an exact join: every product is stored in every cell), at most that many cells and no split.
    """
    if len(sample) == 0:
        return np.zeros((1, sample.shape[1] if sample.ndim == 2 else 1), dtype=np.float32)
    k = int(np.ceil(n_total / block_size))
    if max_cells is not None:
        return kmeans(sample, max(1, min(k, max_cells)), iterations=iterations, seed=seed)
    centroids = kmeans(sample, k, iterations=iterations, seed=seed)
    scale = n_total / len(sample)
    for _ in range(3):  # a few rounds: a split cell can itself be too big
        assign = nearest_centroid(sample, centroids)
        sizes = np.bincount(assign, minlength=len(centroids)) * scale
        big = np.flatnonzero(sizes > max_block_size)
        if len(big) == 0:
            break
        keep = [centroids[np.setdiff1d(np.arange(len(centroids)), big)]]
        for c in big:
            members = sample[assign == c]
            parts = int(np.ceil(sizes[c] / block_size))
            keep.append(kmeans(members, parts, iterations=iterations, seed=seed + int(c))
                        if len(members) > parts else centroids[[c]])
        centroids = np.concatenate(keep).astype(np.float32)
    return centroids


def nearest_cells(x: np.ndarray, centroids: np.ndarray, count: int, chunk: int = 512) -> np.ndarray:
    """(n, count) cell indices, nearest first (column 0 is the home cell), ties by cell index.

    A row's cells do not depend on the rows routed with it: a float32 matrix product can differ in
    its last bits with the shape of the batch around a row (BLAS picks kernels by shape), which would
    move products near a cell border between runs, and an incremental run must find each unchanged
    product where the full join put it. So the float32 product only shortlists ``count + 2`` cells,
    and those are ranked by float64 dot products computed row by row."""
    n, cells = len(x), centroids.shape[0]
    count = min(count, cells)
    if n == 0:
        return np.zeros((0, count), dtype=np.int64)
    sims = x @ centroids.T
    pool = min(cells, count + 2)
    if pool == cells:
        shortlist = np.broadcast_to(np.arange(cells), (n, cells))
    elif pool <= 16:  # a few argmax passes: ~30x faster than argpartition over hundreds of cells
        shortlist = np.empty((n, pool), dtype=np.int64)
        rows = np.arange(n)
        for i in range(pool):
            shortlist[:, i] = np.argmax(sims, axis=1)
            sims[rows, shortlist[:, i]] = -np.inf
    else:
        shortlist = np.argpartition(-sims, pool - 1, axis=1)[:, :pool]
    exact = np.empty(shortlist.shape, dtype=np.float64)
    c64 = centroids.astype(np.float64)
    for start in range(0, n, chunk):  # bounds the (chunk, pool, d) float64 gather
        rows = slice(start, start + chunk)
        exact[rows] = np.einsum("nd,ncd->nc", x[rows].astype(np.float64), c64[shortlist[rows]])
    order = np.lexsort((shortlist, -exact), axis=1)[:, :count]
    return np.take_along_axis(shortlist, order, axis=1).astype(np.int64)
