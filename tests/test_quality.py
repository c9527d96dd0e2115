"""Match quality: metrics by hand, the lexical channel on model numbers, learned weights, the CLI."""
import json

import numpy as np
import pytest

from prodsim_spark import cli, evaluate, fusion, io, lexical, weights
from prodsim_spark.config import FusionWeights, load_config


def neighbours_frame(spark, lists):
    rows = [(q, [(n, 1.0 - i / 10) for i, n in enumerate(ns)]) for q, ns in lists.items()]
    return spark.createDataFrame(rows, "product_id string, neighbours array<struct<product_id:string,score:float>>")


def test_metrics_known_by_hand(spark):
    nb = neighbours_frame(spark, {"a": ["x", "b"], "b": ["a"], "c": ["y", "z", "q"], "d": []})
    pairs = spark.createDataFrame([("a", "b"), ("c", "q"), ("d", "a"), ("e", "a")], "left_id string, right_id string")
    m = evaluate.metrics(nb, pairs)
    # queries: a (matches b, d; b at rank 2), b (a at 1), c (q at 3), d (a: not listed); e is unknown
    assert m["queries"] == 4
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(3 / 4)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3 + 0) / 4, abs=1e-4)  # rounded to 4 places
    assert m["pairs_unknown"] == 2  # e -> a and q -> c: e and q have no row in the table


def test_lexical_channel_separates_model_numbers(spark):
    catalog = spark.createDataFrame(
        [("1", "Sony PSLX350H turntable"), ("2", "SONY PS-LX350H Turntable"),
         ("3", "Sony PSLX450H turntable"), ("4", "kitchen towel"), ("5", None)], "product_id string, title string")
    vecs = {r["product_id"]: r["lexical_embedding"] for r in
            lexical.lexical_vectors(catalog, load_config().lexical).collect()}
    assert vecs["5"] is None  # no text: the channel is missing, not a zero vector
    v = {k: np.array(x) for k, x in vecs.items() if x is not None}
    assert all(abs(np.linalg.norm(x) - 1) < 1e-5 for x in v.values())
    # the same identifier spelled with a hyphen is the same product; one digit off is not
    assert v["1"] @ v["2"] > 0.99 and v["1"] @ v["3"] < 0.9 and v["1"] @ v["4"] < 0.1


def test_fit_recovers_the_informative_component():
    rng = np.random.default_rng(0)
    n_q, per = 300, 8
    query = np.repeat(np.arange(n_q), per)
    positive = np.tile(np.arange(per) == 0, n_q)
    sims = rng.uniform(0, 0.6, size=(n_q * per, len(fusion.COMPONENTS)))
    lex = fusion.COMPONENTS.index("lexical")
    sims[positive, lex] += 0.4  # only the lexical similarity tells matches apart
    avail = np.ones_like(sims, dtype=bool)
    start = FusionWeights(**{c: 1.0 for c in fusion.COMPONENTS})
    report = weights.fit(sims, avail, query, positive, start=start)
    assert report["weights"]["lexical"] == 1.0
    assert all(w < 0.5 for c, w in report["weights"].items() if c != "lexical")
    assert report["loss_after"] < report["loss_before"]


def test_fit_learns_a_same_source_penalty_when_siblings_outrank_matches():
    rng = np.random.default_rng(1)
    n_q, per = 300, 8
    query = np.repeat(np.arange(n_q), per)
    positive = np.tile(np.arange(per) == 0, n_q)
    same = np.tile(np.arange(per) >= per // 2, n_q)  # half the candidates share the query's source; no match does
    sims = rng.uniform(0.3, 0.7, size=(n_q * per, len(fusion.COMPONENTS)))
    sims[same] += 0.15  # same-source siblings look more alike than the other source's listing
    avail = np.ones_like(sims, dtype=bool)
    start = FusionWeights(**{c: 1.0 for c in fusion.COMPONENTS})
    report = weights.fit(sims, avail, query, positive, start=start, same=same, start_penalty=0.0)
    assert 0.1 < report["same_source_penalty"] <= 1.0
    assert report["loss_after"] < report["loss_before"]
    # no same-source candidates: nothing to learn it from, it keeps its start value
    assert weights.fit(sims, avail, query, positive, start=start, same=np.zeros_like(same),
                       start_penalty=0.3)["same_source_penalty"] == 0.3


def test_the_hub_correction_is_chosen_on_held_out_queries_and_stays_0_where_it_hurts():
    rng = np.random.default_rng(2)
    n_q, per = 300, 8
    query = np.repeat(np.arange(n_q), per)
    positive = np.tile(np.arange(per) == 0, n_q)
    hub = rng.uniform(-0.05, 0.05, size=n_q * per)
    hubs = np.tile(np.arange(per) == 1, n_q)  # one candidate per query is a hub: close to everything
    hub[hubs] += 0.3
    sims = rng.uniform(0.3, 0.6, size=(n_q * per, len(fusion.COMPONENTS)))
    sims[positive] += 0.1
    sims[hubs] += 0.15  # ... so it outscores the match
    avail = np.ones_like(sims, dtype=bool)
    start = FusionWeights(**{c: 1.0 for c in fusion.COMPONENTS})
    same = np.zeros(len(sims), dtype=bool)
    beta, recall = weights.choose_hubness(sims, avail, query, positive, same, hub, start=start, start_penalty=0.0)
    assert beta > 0 and recall[beta] > recall[0.0] + 0.2
    # where hub scores say nothing about matches (dense groups of true duplicates), it stays 0
    beta, recall = weights.choose_hubness(sims, avail, query, positive, same, np.where(positive, 0.3, 0.0),
                                          start=start, start_penalty=0.0)
    assert beta == 0.0 and recall[0.0] >= max(recall.values())


def test_fit_weights_writes_weights_penalty_and_hub_correction_that_a_run_loads(sample_run, tmp_path, capsys):
    from conftest import ROOT

    learned = tmp_path / "learned.yaml"
    assert cli.main(["fit-weights", "--output", str(sample_run[0]), "--pairs", str(ROOT / "data" / "sample" / "groups.csv"),
                     "--write", str(learned)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
    join_settings = load_config([str(learned)]).join
    assert join_settings.weights.as_dict() == report["weights"] and max(report["weights"].values()) == 1.0
    assert join_settings.hubness == report["hubness"] and 0.0 <= report["hubness"] <= 1.0
    assert report["loss_after"] <= report["loss_before"]


def test_evaluate_command_on_a_run(spark, tmp_path, capsys):
    nb = neighbours_frame(spark, {"a": ["b"], "b": ["c", "a"]})
    path = str(tmp_path / "run" / "neighbours")
    io.write_delta(nb, path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("idA,idB\na,b\n")
    assert cli.main(["evaluate", "--neighbours", path, "--pairs", str(pairs), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["neighbours table"]["recall@1"] == pytest.approx(0.5)
    assert cli.main(["evaluate", "--neighbours", path, "--pairs", str(pairs), "--left-col", "nope"]) != 0
    assert "no column 'nope'" in capsys.readouterr().err


def test_groups_file_gives_every_pair_within_a_group(spark, tmp_path):
    groups = tmp_path / "groups.csv"
    groups.write_text("product_id,group\na,1\nb,1\nc,1\nd,2\ne,3\ne2,3\n")
    pairs = {(r["left_id"], r["right_id"]) for r in io.read_pairs(spark, str(groups)).collect()}
    assert pairs == {("a", "b"), ("a", "c"), ("b", "c"), ("e", "e2")}


def test_evaluate_without_pairs_reports_coverage(spark, tmp_path, capsys):
    nb = neighbours_frame(spark, {"a": ["b"], "b": ["c", "a"], "c": []})
    path = str(tmp_path / "run" / "neighbours")
    io.write_delta(nb, path)
    assert cli.main(["evaluate", "--neighbours", path, "--pairs", "", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["rows"] == 3 and found["with_neighbours"] == 2 and found["mean_list_length"] == 1.0
