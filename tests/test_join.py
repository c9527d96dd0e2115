"""The join stage on real Spark: near-exact top-K, skew, hard category constraint, known answers."""
import numpy as np
import pytest

from benchmarks.join import exact_top_k
from prodsim_spark import join
from pyspark.sql import functions as F
from prodsim_spark.config import FusionWeights, load_config

TEXT_ONLY = ["join.weights.image=0", "join.weights.brand=0", "join.weights.category=0", "join.weights.price=0"]


def frame(spark, ids, vectors, category=None):
    rows = [(i, [float(x) for x in v], -1 if category is None else int(category[n]), None)
            for n, (i, v) in enumerate(zip(ids, vectors))]
    return spark.createDataFrame(rows, "product_id string, text_embedding array<float>, category long, log_price double")


def neighbour_ids(df):
    return {r["product_id"]: [n["product_id"] for n in r["neighbours"]] for r in df.collect()}


def recall_against_exact(found, x, ids, k):
    exact = exact_top_k(x, np.arange(len(x)), k)
    return np.mean([len(set(ids[exact[i]]) & set(found[ids[i]])) / k for i in range(len(x))])


def test_large_catalogs_sample_in_proportion_to_their_cells_within_the_memory_cap():
    settings = load_config(overrides=["join.sample_size=50000", "join.sample_per_cell=50", "join.block_size=500",
                                      "join.max_sample_mb=1024"]).join
    dims = {"text": 384, "image": 0, "lexical": 0}
    assert join.sample_rows(30_000, dims, settings) == 30_000           # small: every product
    assert join.sample_rows(400_000, dims, settings) == 50_000          # 800 cells x 50 = 40k < sample_size
    assert join.sample_rows(2_000_000, dims, settings) == 200_000       # 4,000 cells x 50
    assert join.sample_rows(100_000_000, dims, settings) == 2**30 // (4 * 384)  # capped at 1 GiB of vectors
    no_text = settings.replaced(weights=settings.weights.replaced(text=0.0, lexical=1.0))
    assert join.sample_rows(100_000_000, {"text": 384, "image": 0, "lexical": 1024}, no_text) == 2**30 // (4 * 1024)


def test_known_answer_and_k_larger_than_catalog(spark):
    ids = ["a", "b", "c", "d"]
    vecs = [[1, 0], [0.8, 0.6], [0, 1], [-1, 0]]
    config = load_config(overrides=TEXT_ONLY + ["join.k=10"])
    got = join.find_neighbours(frame(spark, ids, vecs), config.join).collect()
    by_id = {r["product_id"]: r["neighbours"] for r in got}
    assert [n["product_id"] for n in by_id["a"]] == ["b", "c", "d"]  # self excluded, all others, best first
    assert by_id["a"][0]["score"] == pytest.approx(0.8, abs=1e-6)
    assert by_id["a"][0]["text"] == pytest.approx(0.8, abs=1e-6)
    assert by_id["a"][2]["score"] == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("skewed", [False, True])
def test_recall_close_to_exact_without_all_pairs(spark, skewed):
    rng = np.random.default_rng(5)
    n, d, clusters = 4000, 32, 60
    centres = rng.normal(size=(clusters, d))
    p = np.full(clusters, 0.5 / (clusters - 1))
    p[0] = 0.5 if skewed else p[0]
    p = p / p.sum()
    x = centres[rng.choice(clusters, size=n, p=p)] + rng.normal(scale=0.35, size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"p{i:05d}" for i in range(n)], dtype=object)
    config = load_config(overrides=TEXT_ONLY + ["join.block_size=250", "join.max_block_size=600", "join.spill=6",
                                                      "join.exact_max_products=0"])
    found = neighbour_ids(join.find_neighbours(frame(spark, ids, x), config.join))
    assert len(found) == n and all(len(v) == 10 for v in found.values())
    assert recall_against_exact(found, x, ids, 10) >= 0.95


def test_a_catalog_under_exact_max_products_is_joined_exactly(spark):
    """Blocking only pays on large catalogs: a small one gets exact lists, even from noisy vectors
    that small cells would split (here 30 cells of 100 without the rule)."""
    rng = np.random.default_rng(9)
    n = 3000
    x = rng.normal(size=(n, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.array([f"p{i:05d}" for i in range(n)], dtype=object)
    blocked = TEXT_ONLY + ["join.block_size=100", "join.max_block_size=300", "join.exact_max_products=0"]
    exact = TEXT_ONLY + ["join.block_size=100", "join.max_block_size=300"]
    assert recall_against_exact(neighbour_ids(join.find_neighbours(frame(spark, ids, x), load_config(
        overrides=blocked).join)), x, ids, 10) < 0.9
    assert recall_against_exact(neighbour_ids(join.find_neighbours(frame(spark, ids, x), load_config(
        overrides=exact).join)), x, ids, 10) >= 0.999  # float ties at the K-th place aside


def test_same_source_penalty_only_when_the_catalog_has_several_sources(spark):
    ids, vecs = ["a", "b", "c"], [[1, 0], [0.95, 0.312], [0.8, 0.6]]

    def lists(sources):
        rows = [(i, [float(x) for x in v], s) for i, v, s in zip(ids, vecs, sources)]
        df = spark.createDataFrame(rows, "product_id string, text_embedding array<float>, source long")
        return {r["product_id"]: r["neighbours"] for r in join.find_neighbours(df, load_config(overrides=TEXT_ONLY).join).collect()}

    pooled = lists([1, 1, 2])  # a and b from one feed, c from another
    assert [n["product_id"] for n in pooled["a"]] == ["c", "b"]  # b is nearer, but a sibling in a's own feed
    b = pooled["a"][1]
    assert b["same_source"] == pytest.approx(-0.3) and b["score"] == pytest.approx(b["text"] - 0.3, abs=1e-6)
    single = lists([1, 1, 1])  # one feed: the penalty would change no ranking, and is not applied
    assert [n["product_id"] for n in single["a"]] == ["b", "c"]
    assert all(n["same_source"] == 0 and n["score"] == pytest.approx(n["text"]) for n in single["a"])


def test_hub_correction_ranks_a_product_close_to_everything_below_a_distinct_one(spark):
    # h is the mean direction of x1..x5 (a generic title close to all of them); q is nearer h (0.879)
    # than its own twin x1 (0.820), but h is that close to every product, and x1 is not
    e = np.eye(8)
    h = e[:5].sum(0) / np.sqrt(5)
    q = (e[0] + 1.2 * h) / np.linalg.norm(e[0] + 1.2 * h)
    ids, vectors = ["q", "h", "x1", "x2", "x3", "x4", "x5"], [q, h, *e[:5]]
    products = frame(spark, ids, vectors)
    settings = load_config(overrides=TEXT_ONLY + ["join.k=3"]).join

    plain = {r["product_id"]: r["neighbours"] for r in join.find_neighbours(products, settings).collect()}
    assert [n["product_id"] for n in plain["q"]][:2] == ["h", "x1"]
    corrected = {r["product_id"]: r["neighbours"]
                 for r in join.find_neighbours(products, settings.replaced(hubness=1.0)).collect()}
    assert [n["product_id"] for n in corrected["q"]][:2] == ["x1", "h"]
    assert set(corrected) == set(ids) and all(len(v) == 3 for v in corrected.values())
    # the listed score is the corrected one: cosine - (the candidate's hub score - the catalog's mean), a
    # hub score being the mean of a product's first 10 scores (here all 6 others: lists of 2k are found)
    x = np.array(vectors)
    hub = {i: np.mean(np.delete(x @ x[n], n)) for n, i in enumerate(ids)}
    mean = np.mean(list(hub.values()))
    x1 = corrected["q"][0]
    assert x1["text"] == pytest.approx(float(q @ e[0]), abs=1e-5)
    assert x1["score"] == pytest.approx(float(q @ e[0]) - (hub["x1"] - mean), abs=1e-4)
    with pytest.raises(ValueError, match="join.hubness and join.incremental"):
        settings.replaced(hubness=0.5, incremental=True)


def test_hard_category_constraint(spark):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    ids = np.array([f"p{i:03d}" for i in range(200)], dtype=object)
    category = np.arange(200) % 3
    config = load_config(overrides=TEXT_ONLY + ["join.category_mode=hard", "join.k=5"])
    found = neighbour_ids(join.find_neighbours(frame(spark, ids, x, category), config.join))
    cat = dict(zip(ids, category))
    assert all(cat[n] == cat[q] for q, ns in found.items() for n in ns)
    assert all(len(ns) == 5 for ns in found.values())


def test_ties_are_deterministic(spark):
    ids = ["q", "d", "b", "c", "a"]
    vecs = [[1, 0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0, 1]]
    config = load_config(overrides=TEXT_ONLY + ["join.k=2"])
    first = neighbour_ids(join.find_neighbours(frame(spark, ids, vecs), config.join))
    again = neighbour_ids(join.find_neighbours(frame(spark, ids[::-1], vecs[::-1]).repartition(3), config.join))
    assert first["q"] == again["q"] == ["b", "c"]


def test_a_cell_with_no_home_products_returns_an_empty_frame_arrow_can_convert():
    import pandas as pd
    import pyarrow as pa

    routed = pd.DataFrame({"cell": [0], "home": [False], "product_id": ["a"], "text_vec": [np.ones(2, np.float32).tobytes()],
                           "image_vec": [None], "lexical_vec": [None], "brand": [-1], "category": [-1],
                           "log_price": [np.nan], "source": [-1]})
    out = join.score_cell(routed, dims={"text": 2, "image": 0, "lexical": 0}, weights=FusionWeights.only(text=1.0),
                          price_scale=0.5, k=5)
    assert len(out) == 0
    pa.Array.from_pandas(out["n_product_id"], type=pa.list_(pa.string()))  # raised before the fix


def test_products_sharing_no_content_are_not_neighbours(spark):
    rows = [("gala", [1.0, 0.0], None, 2.0), ("peppers", None, [1.0, 0.0], 2.0),
            ("apple", [0.8, 0.6], [0.6, 0.8], 2.5), ("lone", None, None, 2.0)]
    df = spark.createDataFrame(rows, "product_id string, text_embedding array<float>, image_embedding array<float>, "
                                     "price double").selectExpr("*", "log(price) AS log_price").drop("price")
    found = neighbour_ids(join.find_neighbours(df, load_config().join))
    assert found["gala"] == ["apple"] and found["peppers"] == ["apple"] and found["lone"] == []
    catalog = spark.createDataFrame([(p, i, "ok", None) for i, (p, *_) in enumerate(rows)],
                                    "product_id string, source_row long, status string, reason string")
    embeddings = df.select("product_id", "text_embedding", "image_embedding").withColumn(
        "removed_at", F.lit(None).cast("timestamp"))
    table = {r["product_id"]: r for r in join.neighbours_table(catalog, join.find_neighbours(df, load_config().join),
                                                               embeddings).collect()}
    assert table["lone"]["reason"] == "no_embedding" and table["gala"]["reason"] is None
