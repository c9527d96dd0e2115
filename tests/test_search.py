"""Search on real Spark and real Delta: the persisted index, queries validated like the catalog, batch
search and the notebook API agreeing, and the lexical channel's Python path equal to Spark's."""
import contextlib
import csv
import io

import numpy as np
import pytest
from pyspark.sql import functions as F

from prodsim_spark import cli, lexical
from prodsim_spark.config import LexicalSettings, load_config
from prodsim_spark.index import read_index
from prodsim_spark.search import Searcher
from prodsim_spark.tables import INDEX, SEARCH, RunTables
from conftest import ROOT, assert_same_ranking

IMAGES = ROOT / "data" / "sample" / "images"


def test_a_query_lexical_vector_in_python_equals_the_spark_one(spark):
    texts = ["Bias Peak Pro 5 (Mac)", "PS-LX350H turntable", "恒源祥女士纯羊毛衫圆领", "Xiaomi 小米手环8 NFC版",
             "ソニー ヘッドホン WH-1000XM5", "Crème brûlée 2.5kg", "a", ""]
    settings = LexicalSettings(ngram_sizes=[3, 4], dims=2048)
    df = spark.createDataFrame([(str(i), t) for i, t in enumerate(texts)], "product_id string, title string")
    idf = lexical.fit_idf(df, settings)
    spark_rows = {int(r["product_id"]): r["lexical_embedding"] for r in lexical.lexical_vectors(df, settings, idf).collect()}
    ours, has = lexical.query_vectors(texts, settings, idf)
    for i, text in enumerate(texts):
        if spark_rows[i] is None:
            assert not has[i], text
        else:
            assert has[i] and np.allclose(ours[i], np.array(spark_rows[i]), atol=1e-6), text


def write_queries(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "text", "image_uri", "category", "min_price", "max_price"])
        w.writerows(rows)


def search_rows(spark, out):
    """The search table's rows by source_row (the queries' row order)."""
    return [r for r in sorted(RunTables.at(str(out)).read(spark, SEARCH).collect(), key=lambda r: r["source_row"])]


@pytest.fixture(scope="module")
def searched(spark, sample_run, tmp_path_factory):
    out, _ = sample_run
    folder = tmp_path_factory.mktemp("queries")
    (folder / "img").mkdir()
    (folder / "img" / "banana.jpg").write_bytes((IMAGES / "G006.jpg").read_bytes())
    queries = folder / "queries.csv"
    write_queries(queries, [
        ("q1", "golden delicious apple", "", "", "", ""),
        ("q2", "", "img/banana.jpg", "", "", ""),              # image only, relative to the queries' folder
        ("q3", "apple", "", "", "2.3", "2.6"),                 # a price range
        ("q4", "", "", "", "", ""),                            # nothing to search by
        ("", "banana", "", "", "", ""),                        # no id
        ("q6", "milk", "", "no such category", "", ""),        # a filter no product passes
        ("q7", "green apple", str(ROOT / "setup.py"), "", "", ""),  # an image outside the allowed folders
        ("q1", "a duplicate id", "", "", "", ""),
        ("q9", "banana", "", "", "cheap", ""),
    ])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["search", "--output", str(out), "--queries", str(queries), "--k", "5", "--progress", "off"]) == 0
    return out, printed.getvalue(), search_rows(spark, out)


def test_every_query_gets_results_or_a_reason(searched):
    out, printed, rows = searched
    assert "prodsim search: 9 queries, 5 with results, 3 rejected" in printed
    assert [r["query_id"] for r in rows] == ["q1", "q2", "q3", "q4", None, "q6", "q7", "q1", "q9"]
    assert rows[3]["status"] == "rejected" and rows[3]["reason"] == "no_content" and rows[3]["results"] == []
    assert rows[4]["reason"] == "missing_query_id"
    assert rows[5]["reason"] == "no_results" and rows[5]["results"] == []
    assert rows[6]["status"] == "warn" and rows[6]["reason"] == "image_not_allowed" and rows[6]["results"]
    assert rows[7]["reason"] == "duplicate_query_id" and rows[7]["results"] == []  # the first q1 keeps its id
    assert rows[8]["reason"] == "unparsable_min_price" and rows[8]["results"]  # the filter is dropped
    assert len({r["index_fingerprint"] for r in rows}) == 1
    for r in rows:
        scores = [x["score"] for x in r["results"]]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 5
        for x in r["results"]:
            assert abs(x["text"] + x["image"] + x["lexical"] - x["score"]) < 1e-4  # the parts add up


def test_search_ranks_by_content_and_keeps_to_the_filters(spark, searched):
    out, _, rows = searched
    catalog = {r["product_id"]: r for r in RunTables.at(str(out)).read(spark, "catalog").collect()}
    first = rows[0]["results"][0]
    assert "golden delicious" in (catalog[first["product_id"]]["title"] or "").lower()
    banana = rows[1]["results"][0]
    assert banana["product_id"] == "G006" and banana["score"] > 0.999 and banana["text"] == 0  # its own photo
    assert rows[2]["results"] and all(2.3 <= catalog[x["product_id"]]["price"] <= 2.6 for x in rows[2]["results"])


def test_the_index_holds_the_cells_and_refuses_another_config(spark, sample_run, searched, tmp_path, capsys):
    out, _ = sample_run
    index = read_index(RunTables.at(str(out)).read(spark, INDEX))
    assert index.centroids.shape[0] >= 1 and index.idf is not None and index.meta["dims"]["text"] == 384
    queries = tmp_path / "q.csv"
    write_queries(queries, [("q1", "apple", "", "", "", "")])
    code = cli.main(["search", "--output", str(out), "--queries", str(queries), "--set", "join.weights.text=0.5",
                     "--progress", "off"])
    err = capsys.readouterr().err
    assert code == 2 and "fusion weights (join.weights)" in err and "'text': 1.0" in err and "'text': 0.5" in err


def batch(row):
    """A search table row's results as (ids, scores)."""
    return [x["product_id"] for x in row["results"]], [x["score"] for x in row["results"]]


def test_the_notebook_api_answers_as_the_batch_search(spark, sample_run, searched):
    out, _, rows = searched
    searcher = Searcher.load(spark, str(out), load_config())
    got = searcher.search(text="golden delicious apple", k=5)
    assert list(got.columns[:4]) == ["rank", "product_id", "title", "score"]
    assert_same_ranking("golden delicious apple", (list(got["product_id"]), list(got["score"])), batch(rows[0]))
    photo = searcher.search(image=str(IMAGES / "G006.jpg"), k=3)
    assert photo["product_id"].iloc[0] == "G006"
    ranged = searcher.search(text="apple", k=5, min_price=2.3, max_price=2.6)
    assert_same_ranking("apple", (list(ranged["product_id"]), list(ranged["score"])), batch(rows[2]))
    with pytest.raises(ValueError, match="give a text"):
        searcher.search()


def test_search_quality_metrics_count_relevant_results_and_first_ranks():
    from benchmarks.search import exact_ranking, query_text, ranking_metrics

    ranked = [["a", "x", "b"], ["x", "y", "c"], ["z"]]
    relevant = [{"a", "b"}, {"c"}, {"q"}]
    m = ranking_metrics(ranked, relevant, k=3)
    near = lambda x: pytest.approx(x, abs=1e-4)  # noqa: E731 (the figures are rounded to 4 places)
    assert m["recall@1"] == near(1 / 3) and m["recall@3"] == near(2 / 3)
    assert m["precision@3"] == near((2 + 1 + 0) / 9) and m["mrr"] == near((1 + 1 / 3) / 3)
    # -inf (no shared modality) is never ranked, whatever k asks for
    scores = np.array([[0.2, -np.inf, 0.9]])
    assert exact_ranking(scores, np.array(["p", "q", "r"], dtype=object), 3) == [["r", "p"]]
    assert query_text("Golden-Delicious", "Apple") == "Golden Delicious Apple"
    assert query_text("Bravo-Apple-Juice", "Juice") == "Bravo Apple Juice"



def test_the_tuned_image_bench_never_searches_a_listing_it_trained_on(tmp_path):
    """bench search --tuned-image splits the listings in two halves: every listing in exactly one, with
    its group, so the searched half holds none of the photos the encoder was tuned on."""
    from benchmarks.search import halves

    ids = [f"L{i:012x}" for i in range(40)]
    (tmp_path / "catalog.csv").write_text("product_id,title,image_uri\n" + "".join(f"{i},Milk,{i}.jpg\n" for i in ids))
    (tmp_path / "groups.csv").write_text("product_id,group\n" + "".join(f"{i},{n % 4}\n" for n, i in enumerate(ids)))
    parts = halves(tmp_path / "catalog.csv", tmp_path / "groups.csv", tmp_path / "out")

    def read(path):
        return list(csv.DictReader(open(path, encoding="utf-8")))

    tune, searched = ({r["product_id"] for r in read(parts[side][0])} for side in ("tune", "search"))
    assert tune and searched and not tune & searched and tune | searched == set(ids)
    for side in ("tune", "search"):
        groups = {r["product_id"]: r["group"] for r in read(parts[side][1])}
        assert set(groups) == {r["product_id"] for r in read(parts[side][0])}
        assert all(groups[i] == str(ids.index(i) % 4) for i in groups)


def test_a_blocked_index_answers_the_same_in_batch_and_notebook_and_close_to_exact(spark):
    """Many cells (a large catalog's case): products stored in their search.spill nearest cells, a
    query searched from its nearest; with two probes a product stored in both is listed once."""
    from benchmarks.join import clustered_vectors, synthetic_products
    from benchmarks.search import exact_search, query_vectors, synthetic_queries, text_products
    from prodsim_spark.config import FusionWeights
    from prodsim_spark.index import build_index
    from prodsim_spark.join import plan_cells
    from prodsim_spark.search import search_products

    n, d, queries = 3000, 32, 300
    config = load_config(overrides=["join.exact_max_products=0", "join.block_size=100", "join.max_block_size=400"])
    settings = config.join.replaced(weights=FusionWeights.only(text=1.0))
    config = config.model_copy(update={"join": settings})
    products = synthetic_products(spark, n, d).cache()
    cells = plan_cells(products, settings)
    assert len(cells.centroids) >= 20
    index = build_index(cells.centroids, None, cells.shape.dims, config, "synthetic", None)
    x, q = clustered_vectors(0, n, d, 7, n), query_vectors(0, queries, d, 7, n, queries)
    exact = exact_search(x, q, 10)
    batch = synthetic_queries(spark, n, queries, d)
    found = {r["query_id"]: list(r["ids"]) for r in search_products(batch, products, index, config.search)
             .select("query_id", F.col("results.product_id").alias("ids")).collect()}
    searcher = Searcher(index, text_products(np.array([f"p{i:07d}" for i in range(n)], dtype=object), x), {}, {}, config)
    hits = 0
    for i in range(queries):
        api = list(searcher.search_vectors(text_products(np.array(["q"], dtype=object), q[i][None, :]), k=10)["product_id"])
        assert found[f"q{i:07d}"] == api
        hits += len(set(api) & {f"p{j:07d}" for j in exact[i]})
    assert hits / (10 * queries) >= 0.95
    two = config.search.model_copy(update={"probe": 2})
    for r in search_products(batch, products, index, two).select(F.col("results.product_id").alias("ids")).collect():
        assert len(r["ids"]) == len(set(r["ids"])) == 10
    products.unpersist()
