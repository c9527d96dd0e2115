"""Pure parts of the join: fused scores, renormalisation, top-K ties, IVF cells under skew."""
from functools import partial

import numpy as np

from prodsim_spark import fusion
from prodsim_spark.config import FusionWeights

W = FusionWeights.only(text=1.0, image=1.0, brand=0.5)


def products(ids, text=None, image=None, brand=None, category=None, price=None, source=None):
    n = len(ids)
    t, ht = fusion.stack_vectors(text or [None] * n, 2)
    i, hi = fusion.stack_vectors(image or [None] * n, 2)
    return fusion.Products(np.array(ids, dtype=object), {"text": t, "image": i}, {"text": ht, "image": hi},
                           np.array(brand or [-1] * n, dtype=np.int64), np.array(category or [-1] * n, dtype=np.int64),
                           np.log(np.array([np.nan if p is None else p for p in (price or [None] * n)], dtype=float)),
                           np.array(source or [-1] * n, dtype=np.int64))


def test_scores_known_by_hand():
    p = products(["a", "b", "c"], text=[[1, 0], [1, 0], [0, 1]], image=[[1, 0], [0, 1], None], brand=[7, 7, -1])
    score, parts = fusion.pair_scores(p, p, W, price_scale=0.5)
    # a-b: text 1, image 0, brand 1 -> (1*1 + 1*0 + 0.5*1) / 2.5
    assert np.isclose(score[0, 1], 1.5 / 2.5)
    # a-c: c has no image and no brand: only text counts, renormalised -> cos = 0
    assert np.isclose(score[0, 2], 0.0) and np.isclose(parts["text"][0, 2], 0.0)
    # contributions add up to the score
    total = sum(parts.values())
    assert np.allclose(total, score)


def test_missing_modality_renormalises_to_the_shared_ones():
    full = products(["x", "y"], text=[[1, 0], [0.6, 0.8]], image=[[1, 0], [1, 0]])
    text_only = products(["z"], text=[[0.6, 0.8]])
    s_full, _ = fusion.pair_scores(full, full, FusionWeights.only(text=1, image=1), price_scale=0.5)
    s_part, parts = fusion.pair_scores(full.take([0]), text_only, FusionWeights.only(text=1, image=1), price_scale=0.5)
    assert np.isclose(s_full[0, 1], (0.6 + 1.0) / 2)
    assert np.isclose(s_part[0, 0], 0.6)  # the text cosine alone, on the same 0..1 scale
    assert parts["image"][0, 0] == 0


def test_a_query_component_the_product_lacks_counts_with_the_missing_share():
    # search: the query has text and a photo; one listing has the same text and no photo, the other a
    # slightly different text and a photo like the query's
    query = products(["q"], text=[[1, 0]], image=[[1, 0]])
    listings = products(["text only", "with photo"], text=[[1, 0], [0.8, 0.6]], image=[None, [0.6, 0.8]])
    w = FusionWeights.only(text=1, image=1)
    s0, _ = fusion.pair_scores(query, listings, w, price_scale=0.5)  # the join's rule
    assert np.allclose(s0[0], [1.0, 0.7]) and s0[0, 0] > s0[0, 1]
    s, parts = fusion.pair_scores(query, listings, w, price_scale=0.5, missing_share=0.5)
    assert np.allclose(s[0], [1.0 / 1.5, 0.7])  # the absent photo counts as 0 with half its weight
    assert s[0, 1] > s[0, 0] and np.allclose(sum(parts.values()), s)
    # only components the query has: a text query is unchanged, and so is the photo a query lacks
    s_text, _ = fusion.pair_scores(query.take([0]), listings, FusionWeights.only(text=1), price_scale=0.5,
                                   missing_share=0.5)
    assert np.allclose(s_text[0], [1.0, 0.8])
    reverse, _ = fusion.pair_scores(listings, query, w, price_scale=0.5, missing_share=0.5)
    assert np.allclose(reverse[:, 0], [1.0, 0.7])


def test_price_term():
    p = products(["a", "b"], text=[[1, 0], [1, 0]], price=[10.0, 20.0])
    score, parts = fusion.pair_scores(p, p, FusionWeights.only(text=1, price=1), price_scale=0.5)
    assert np.isclose(parts["price"][0, 1], np.exp(-np.log(2) / 0.5) / 2, atol=1e-6)


def test_same_source_penalty_is_a_part_of_the_score():
    # a, b from source 1; c from source 2; d has no known source
    p = products(["a", "b", "c", "d"], text=[[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], source=[1, 1, 2, -1])
    plain, _ = fusion.pair_scores(p, p, FusionWeights.only(text=1), price_scale=0.5)
    score, parts = fusion.pair_scores(p, p, FusionWeights.only(text=1), price_scale=0.5, same_source_penalty=0.3)
    assert np.isclose(score[0, 1], plain[0, 1] - 0.3) and np.isclose(parts["same_source"][0, 1], -0.3)
    assert np.isclose(score[0, 2], plain[0, 2])  # other source: untouched
    assert np.isclose(score[0, 3], plain[0, 3]) and np.isclose(score[3, 3], plain[3, 3])  # unknown: untouched
    assert np.allclose(sum(parts.values()), score)  # the penalty is one of the parts that add up
    # the other source's product now ranks first for a, though b is more similar
    _, idx = fusion.top_k(score[[0]], p.ids[[0]], p.ids, 1)
    assert p.ids[idx][0] == "c" and plain[0, 1] > plain[0, 2]
    assert "same_source" not in fusion.pair_scores(p, p, FusionWeights.only(text=1), price_scale=0.5)[1]  # off by default


def test_top_k_excludes_self_and_breaks_ties_by_id():
    ids = np.array(["q", "d", "b", "c", "a"], dtype=object)
    score = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]], dtype=np.float32)
    _, idx = fusion.top_k(score, np.array(["q"], dtype=object), ids, 2)
    assert list(ids[idx]) == ["b", "c"]  # q itself skipped; the 0.5 ties in id order
    _, all_ = fusion.top_k(score, np.array(["q"], dtype=object), ids, 50)  # K larger than the block
    assert list(ids[all_]) == ["b", "c", "d", "a"]
    # the same answer whatever the member order
    perm = np.array([4, 2, 0, 3, 1])
    _, idx2 = fusion.top_k(score[:, perm], np.array(["q"], dtype=object), ids[perm], 2)
    assert list(ids[perm][idx2]) == ["b", "c"]


def test_top_k_many_rows_vectorised():
    rng = np.random.default_rng(1)
    score = rng.random((50, 30)).astype(np.float32)
    ids = np.array([f"m{i:02d}" for i in range(30)], dtype=object)
    rows, cols = fusion.top_k(score, np.array([f"q{i}" for i in range(50)], dtype=object), ids, 5)
    for r in range(50):
        assert list(cols[rows == r]) == list(np.argsort(-score[r])[:5])


def test_nan_scores_are_not_neighbours():
    score = np.array([[np.nan, 0.2]], dtype=np.float32)
    _, idx = fusion.top_k(score, np.array(["q"], dtype=object), np.array(["a", "b"], dtype=object), 5)
    assert list(idx) == [1]


def clustered(n, d, clusters, rng, weights=None):
    centres = rng.normal(size=(clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    which = rng.choice(clusters, size=n, p=weights)
    x = centres[which] + rng.normal(scale=0.6 / np.sqrt(d), size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_skewed_sample_gets_no_giant_cell():
    rng = np.random.default_rng(0)
    weights = np.array([0.5] + [0.5 / 49] * 49)
    x = clustered(20000, 16, 50, rng, weights)  # one cluster holds half the products
    centroids = fusion.train_cells(x[:5000], len(x), block_size=400, max_block_size=1200, iterations=8, seed=1)
    sizes = np.bincount(fusion.nearest_cells(x, centroids, 1)[:, 0], minlength=len(centroids))
    assert sizes.max() <= 2 * 1200  # predicted from a sample: allow sampling noise, but no 10,000 block


def test_kmeans_with_hundreds_of_cells_keeps_groups_whole():
    """Seeds for many cells are drawn in rounds (one matrix product each), which must still place a
    seed in nearly every group, as one-at-a-time k-means++ does (the join's recall rests on it)."""
    rng = np.random.default_rng(0)
    label = np.repeat(np.arange(300), 20)
    centres = rng.normal(size=(300, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[label] + rng.normal(scale=0.05, size=(len(label), 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    centroids = fusion.kmeans(x, 300, iterations=5, seed=1)
    assign = fusion.nearest_centroid(x, centroids, chunk_scores=1000)  # chunked: 3 rows at a time
    assert (assign == np.argmax(x @ centroids.T, axis=1)).all()
    whole = sum(len(set(assign[label == g])) == 1 for g in range(300))
    assert whole >= 276, whole  # here 282; one-at-a-time seeding 289, seeds in one round (D^2 of the first only) 270


def test_nearest_cells_sorted():
    c = np.eye(3, dtype=np.float32)
    x = np.array([[0.1, 0.9, 0.3]], dtype=np.float32)
    assert list(fusion.nearest_cells(x, c, 2)[0]) == [1, 2]
    assert list(fusion.nearest_cells(x, np.vstack([c, c[1:2]]), 2)[0]) == [1, 3]  # a tie: lower cell first


def test_a_products_cells_do_not_depend_on_its_batch():
    """An incremental run finds each unchanged product in the cells the full join put it in, though
    Spark hands it to the router with other rows around it."""
    rng = np.random.default_rng(3)
    x = clustered(6000, 64, 40, rng)
    centroids = fusion.train_cells(x, len(x), block_size=50, max_block_size=200, iterations=4, seed=0)
    whole = fusion.nearest_cells(x, centroids, 3)
    for size in (1, 7, 1000):
        parts = np.concatenate([fusion.nearest_cells(x[i:i + size], centroids, 3) for i in range(0, 600, size)])
        assert (parts == whole[:len(parts)]).all(), size
    exact = np.argsort(-(x.astype(np.float64) @ centroids.T.astype(np.float64)), axis=1, kind="stable")[:, :3]
    assert (whole == exact).mean() > 0.999


def test_a_pair_with_no_shared_content_is_never_listed():
    """Grocery-like listings: a text-only 'royal gala' (no photo) and a photo-only pepper listing of the same
    price share nothing but the price; renormalised over price alone they scored 0.92 and came first."""
    d = FusionWeights()  # the default weights: text, image, lexical, brand, category, price
    text = [[1, 0], None, [0.8, 0.6], None]          # gala (text only), peppers (photo only), apple (text + photo), pepper (photo only)
    image = [None, [1, 0], [0.6, 0.8], [0.9, 0.44]]
    p = products(["gala", "peppers", "apple", "pepper2"], text=text, image=image, price=[2.0, 2.0, 2.5, 9.0])
    lexical, has_lexical = fusion.stack_vectors([[1, 0], None, [0.9, 0.44], None], 2)
    p.vectors["lexical"], p.has["lexical"] = lexical, has_lexical
    score, parts = fusion.pair_scores(p, p, d, price_scale=0.5)
    assert np.isnan(score[0, 1]) and np.isnan(score[1, 0])  # gala vs peppers: price alone, not compared
    assert np.isfinite(score[0, 2]) and np.isfinite(score[1, 3])  # text with text, photo with photo
    rows, cols = fusion.top_k(score, p.ids, p.ids, k=3)
    listed = {p.ids[r]: [p.ids[c] for c, rr in zip(cols, rows) if rr == r] for r in set(rows)}
    assert listed["gala"] == ["apple"] and "gala" not in listed["peppers"]
    assert all(np.isnan(v[0, 1]) for v in parts.values())  # no part of it is reported either
    # with no content weight at all, the attributes are all there is: then they do compare
    only_price, _ = fusion.pair_scores(p, p, FusionWeights.only(price=1.0), price_scale=0.5)
    assert np.isclose(only_price[0, 1], 1.0)


def test_arrow_vectors_read_as_the_pandas_path_does():
    """The incremental scan reads vectors from Arrow without a Python object per row; missing, zero and
    wrong-length vectors must come out as the pandas path (fusion.stack_vectors) makes them."""
    import pyarrow as pa

    from prodsim_spark.join import arrow_vectors

    rows = [[3.0, 4.0, 0.0], None, [0.0, 0.0, 0.0], [1.0, 2.0], [0.0, 1.0, 0.0]]
    column = pa.chunked_array([pa.array(rows[:2], pa.list_(pa.float32())), pa.array(rows[2:], pa.list_(pa.float32()))])
    got, got_has = arrow_vectors(column, 3)
    want, want_has = fusion.stack_vectors([None if r is None else np.array(r, np.float32) for r in rows], 3)
    assert got_has.tolist() == want_has.tolist() == [True, False, False, False, True]
    assert np.allclose(got, want) and np.allclose(got[0], [0.6, 0.8, 0.0])
    got, got_has = arrow_vectors(pa.array([[1.0, 0.0]] * 4, pa.list_(pa.float32())), 2)  # none missing
    assert got_has.all() and got.shape == (4, 2)


def random_products(rng, n, dim=384, prefix="p"):
    """n products with unit text and image vectors (some missing), brands, prices and two sources."""
    def unit(rows):
        v = rng.normal(size=(rows, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    t, i = unit(n), unit(n)
    has_t, has_i = rng.random(n) > 0.1, rng.random(n) > 0.3
    has_t |= ~has_i  # every product has some content
    return fusion.Products(np.array([f"{prefix}{j:04d}" for j in range(n)], dtype=object),
                           {"text": t * has_t[:, None], "image": i * has_i[:, None]}, {"text": has_t, "image": has_i},
                           rng.integers(-1, 5, n), rng.integers(-1, 3, n), np.log(rng.uniform(1, 50, n)),
                           rng.integers(0, 2, n))


def test_paired_scores_are_the_matrix_scores_pair_by_pair():
    rng = np.random.default_rng(0)
    q, m = random_products(rng, 30), random_products(rng, 40, prefix="m")
    w = FusionWeights.only(text=1.0, image=0.7, brand=0.2, category=0.1, price=0.3)
    for kwargs in ({}, {"same_source_penalty": 0.3}, {"missing_share": 0.5}):
        score, parts = fusion.pair_scores(q, m, w, price_scale=0.5, **kwargs)
        r, c = np.meshgrid(np.arange(len(q)), np.arange(len(m)), indexing="ij")
        r, c = r.ravel(), c.ravel()
        paired, paired_parts = fusion.pair_scores(q.take(r), m.take(c), w, price_scale=0.5, paired=True, **kwargs)
        assert paired.shape == (len(r),) and paired.dtype == np.float32
        assert np.allclose(paired, score[r, c], atol=1e-6, equal_nan=True), kwargs
        assert set(paired_parts) == set(parts)
        for name, v in parts.items():
            assert np.allclose(paired_parts[name], v[r, c], atol=1e-6, equal_nan=True), (kwargs, name)


def test_exact_top_k_does_not_depend_on_the_batch():
    """Copies of a listing (identical vectors) scored against a query in batches of different shapes
    (a float32 matrix product's last bits depend on the shape): the same ids, order and score bits."""
    rng = np.random.default_rng(1)
    m = random_products(rng, 300, prefix="m")
    copies = np.array([7, 7, 7, 42, 42])  # five rows that copy two products, under other ids
    m = fusion.Products(np.concatenate([m.ids, [f"c{j}" for j in range(len(copies))]]).astype(object),
                        {k: np.concatenate([v, v[copies]]) for k, v in m.vectors.items()},
                        {k: np.concatenate([v, v[copies]]) for k, v in m.has.items()},
                        np.concatenate([m.brand, m.brand[copies]]), np.concatenate([m.category, m.category[copies]]),
                        np.concatenate([m.log_price, m.log_price[copies]]), np.concatenate([m.source, m.source[copies]]))
    q = m.take(np.array([7, 42, 3, 100]))  # queries whose nearest members are the copies
    w = FusionWeights.only(text=1.0, image=1.0, price=0.2)

    def ranked(queries, members):
        scorer = partial(fusion.pair_scores, weights=w, price_scale=0.5)
        score, _ = scorer(queries, members)
        rows, cols, best, _ = fusion.exact_top_k(score, queries, members, 4, scorer)
        return {queries.ids[r]: [] for r in rows} | {
            queries.ids[r]: [(members.ids[c], s) for rr, c, s in zip(rows, cols, best) if rr == r] for r in set(rows)}

    whole = ranked(q, m)
    one_by_one = {}
    for j in range(len(q)):
        one_by_one |= ranked(q.take([j]), m)
    kept = np.unique(np.concatenate([np.arange(0, 300, 3), np.arange(300, len(m)), [7, 42, 3, 100]]))
    fewer_members = ranked(q, m.take(kept))  # another cell holding some of the same members
    for qid, want in whole.items():
        assert one_by_one[qid] == want, qid  # same ids, same order, same float32 bits
        common = [x for x in want if x[0] in set(m.ids[kept])]
        assert fewer_members[qid][:len(common)] == common, qid
    # the copies of product 7 tie with it exactly, and stand in id order behind the query's own copies
    ids = [i for i, _ in whole["m0007"]]
    assert ids[:3] == ["c0", "c1", "c2"] and len({s for _, s in whole["m0007"][:3]}) == 1
