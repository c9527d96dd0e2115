"""The ``prodsim`` command line: argument parsing, early checks, a session, a summary.

Everything that can be checked without Spark (arguments, config, the catalog's path and header) is
checked first, so a mistake costs a second rather than a JVM start.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from pathlib import Path

from prodsim_spark.config import CATALOG_FORMATS, ProdsimConfig, load_config, parse_override
from prodsim_spark.errors import ConfigError, InputError, ProdsimError

log = logging.getLogger("prodsim_spark.cli")
# the checkout's shared datasets (benchmark defaults; a wheel install has none)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_EXIT_USAGE = 2
# command-line flags that are shorthands for one config key each
_FLAG_KEYS = {"format": "ingest.format", "k": "join.k", "threshold": "group.threshold"}


def _sizes(text: str) -> tuple[int, ...]:
    """``--sizes``: catalog sizes, comma-separated, at least two (an exponent needs two points)."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 100000,400000, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1000:
        raise argparse.ArgumentTypeError(f"expected two or more sizes of at least 1000, got {text!r}")
    return sizes


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="YAML config file layered over the defaults (conf/default.yaml); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config key, e.g. --set ingest.columns.title=name; repeatable")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--progress", default="auto", choices=["auto", "tty", "log", "off"],
                        help="progress of long stages: a line redrawn on a terminal (tty), a log line every 30 s "
                             "(log), or none; auto: tty on a terminal, else log")


def _add_pairs_args(parser: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    parser.add_argument("--pairs", required=required, default=None, metavar="CSV",
                        help="labelled matches, a CSV with a header: pairs (two id columns) or groups (an id column "
                             f"and 'group': every two products of a group match); {what}")
    parser.add_argument("--left-col", default=None, help="pairs column with one product id (default: the first)")
    parser.add_argument("--right-col", default=None, help="pairs column with the other (default: the second)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prodsim",
        description="Catalog-scale product similarity on Spark: validates a product catalog, embeds "
                    "text and images, and writes each product's K most similar products to Delta tables.",
        epilog="Run 'prodsim COMMAND --help' for a command's options. Config reference: conf/default.yaml.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the whole job on a catalog",
        description="Run every stage on a catalog and write Delta tables under --output: "
                    "catalog (validated rows, each with status and reason), embeddings (text and "
                    "image vectors, incremental: a re-run encodes only new or changed products), neighbours (each "
                    "product's K most similar products with per-component scores).")
    run.add_argument("--catalog", required=True, metavar="PATH",
                     help="catalog file or folder (local path, file://, s3a://, dbfs:/, abfss://)")
    run.add_argument("--output", required=True, metavar="DIR", help="folder for the output Delta tables")
    run.add_argument("--format", choices=CATALOG_FORMATS, default=None,
                     help="catalog format (default: ingest.format, 'auto' = from the path)")
    _add_config_args(run)

    st_ingest = sub.add_parser("ingest", help="stage 1: validate a catalog into <output>/catalog",
                               description="Read and validate a catalog; every row lands in <output>/catalog "
                                           "with a status and reason.")
    st_ingest.add_argument("--catalog", required=True, metavar="PATH")
    st_ingest.add_argument("--output", required=True, metavar="DIR")
    st_ingest.add_argument("--format", choices=CATALOG_FORMATS, default=None)
    _add_config_args(st_ingest)
    st_embed = sub.add_parser("embed", help="stage 2: encode new or changed products into <output>/embeddings",
                              description="Encode the texts and images of <output>/catalog that are new or "
                                          "changed since the last run, and MERGE them into <output>/embeddings.")
    st_embed.add_argument("--output", required=True, metavar="DIR")
    _add_config_args(st_embed)
    st_join = sub.add_parser("neighbours", help="stage 3: write <output>/neighbours from catalog and embeddings",
                             description="Each product's K most similar products by fused score, from "
                                         "<output>/catalog and <output>/embeddings, into <output>/neighbours.")
    st_join.add_argument("--output", required=True, metavar="DIR")
    _add_config_args(st_join)

    bench = sub.add_parser("bench", help="benchmarks: ours vs a baseline, in one run",
                           description="Benchmarks that compare ours with a baseline in one run (medians of repeats).")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT")
    b_embed = bench_sub.add_parser(
        "embed", help="Spark embedding stage vs the bare encoder (text and images)",
        description="Throughput of the Spark embedding stage vs the bare encoder in one process, on the same "
                    "rows and batch size: rows_per_s_spark, rows_per_s_bare and ratio (spark/bare), text and images.")
    b_embed.add_argument("--rows", type=int, default=2000, help="texts to encode (sample catalog, cycled)")
    b_embed.add_argument("--image-rows", type=int, default=400, help="images to decode and encode (0: skip)")
    b_embed.add_argument("--repeats", type=int, default=3, help="runs of each; medians are reported")
    b_embed.add_argument("--runtimes", choices=["yes", "no"], default="yes",
                         help="also measure every CPU runtime (embed.*.runtime): rows/s and quality cost")
    b_embed.add_argument("--amazon-google", metavar="DIR", default=str(SHARED_DATA / "amazon-google"),
                         help="Amazon-Google folder for the text runtimes' R@10 (skipped when absent)")
    b_embed.add_argument("--grocery", metavar="DIR", default=str(SHARED_DATA / "grocery"),
                         help="grocery folder for the image runtimes' R@1 (skipped when absent)")
    b_embed.add_argument("--work", default="out/bench-embed", metavar="DIR", help="scratch folder (grocery listings)")
    b_embed.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_config_args(b_embed)
    b_join = bench_sub.add_parser(
        "join", help="our blocked join vs exact top-K vs Spark MLlib LSH",
        description="On clustered synthetic unit vectors: our join, exact top-K by brute force (on a sample of "
                    "queries, time extrapolated to all N), and at N <= 20,000 Spark MLlib "
                    "BucketedRandomProjectionLSH self-join + per-item top-K. Recall is against exact.")
    b_join.add_argument("--n", type=int, default=20000, help="products")
    b_join.add_argument("--k", type=int, default=None, help="neighbours per product (sets join.k; default: join.k)")
    b_join.add_argument("--d", type=int, default=384, help="vector dimension")
    b_join.add_argument("--sample", type=int, default=2000, help="queries checked against exact search")
    b_join.add_argument("--mllib", choices=["auto", "yes", "no"], default="auto",
                        help="run the MLlib baseline (auto: when N <= 20,000; it grows as N^2)")
    b_join.add_argument("--mllib-bucket-length", type=float, default=1.0)
    b_join.add_argument("--mllib-tables", type=int, default=4)
    b_join.add_argument("--repeats", type=int, default=3, help="runs of ours; the median is reported")
    b_join.add_argument("--scaling", action="store_true",
                        help="run ours at each of --sizes and fit the exponent of time vs N")
    b_join.add_argument("--sizes", type=_sizes, default=(50_000, 100_000, 200_000, 400_000), metavar="N,N,...",
                        help="--scaling: the catalog sizes (default 50000,100000,200000,400000)")
    b_join.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_config_args(b_join)
    b_quality = bench_sub.add_parser(
        "quality", help="match quality on a labelled benchmark (amazon-google or grocery)",
        description="Builds the benchmark catalog, runs ingest + embed, then measures recall@k/MRR of a character "
                    "n-gram TF-IDF baseline, each modality alone, the fused default and fused with learned weights "
                    "(two-fold cross-validated), all in one run. benchmarks/quality.yaml (join.k: 20) is layered "
                    "under --conf/--set.")
    b_quality.add_argument("--dataset", choices=["amazon-google", "grocery"], required=True)
    b_quality.add_argument("--data", required=True, metavar="DIR", help="the dataset's folder")
    b_quality.add_argument("--work", default="out/quality", metavar="DIR", help="scratch folder for tables")
    b_quality.add_argument("--json", action="store_true")
    _add_config_args(b_quality)

    b_search = bench_sub.add_parser(
        "search", help="batch search and the single-query API vs exact search (synthetic), or search quality "
                       "on a labelled dataset (--dataset)",
        description="Without --dataset, on clustered synthetic vectors: batch search on Spark and the notebook API "
                    "(one query at a time after loading) vs exact search (every product scored, numpy, on a sample "
                    "of queries, time extrapolated): recall@k, queries/s, single-query latency. With --dataset: "
                    "grocery, one query per product (name + kind, its iconic photo; text, image, both) over a "
                    "split's listings; amazon-google, each matched Google title over the Amazon catalog. R@1, R@k, "
                    "P@k, MRR of ours, exact fused scoring and a baseline (mean text/image cosine; TF-IDF).")
    b_search.add_argument("--n", type=int, default=100_000, help="products")
    b_search.add_argument("--queries", type=int, default=100_000, help="queries in the batch")
    b_search.add_argument("--d", type=int, default=384, help="vector dimension")
    b_search.add_argument("--sample", type=int, default=1000, help="queries checked against exact search")
    b_search.add_argument("--dataset", choices=["amazon-google", "grocery"], default=None,
                          help="measure search quality on this labelled dataset instead")
    b_search.add_argument("--data", metavar="DIR", help="the dataset's folder (with --dataset)")
    b_search.add_argument("--work", default="out/bench-search", metavar="DIR", help="scratch folder (with --dataset)")
    b_search.add_argument("--split", choices=["train", "val"], default="train", help="grocery: the listings' split")
    b_search.add_argument("--tuned-image", action="store_true",
                          help="grocery: fine-tune the image encoder on half the listings' groups and search the "
                               "other half, pretrained and tuned (benchmarks/search.py: bench_tuned_image_search)")
    b_search.add_argument("--json", action="store_true")
    _add_config_args(b_search)

    b_inc = bench_sub.add_parser(
        "incremental", help="a day's re-run after a share of the catalog changed: incremental vs full (synthetic)",
        description="Day 1: a full join of N synthetic products. Day 2: a share --changed edited, removed or added "
                    "(a third each); the incremental re-run vs a full run (new cells) in one run, and whether its "
                    "lists equal a full join over day 1's cells (same_lists).")
    b_inc.add_argument("--n", type=int, default=400_000, help="products on day 1")
    b_inc.add_argument("--changed", type=float, default=0.01, help="share of products that change")
    b_inc.add_argument("--d", type=int, default=384, help="vector dimension")
    b_inc.add_argument("--work", default="out/bench-incremental", metavar="DIR", help="scratch folder for tables")
    b_inc.add_argument("--json", action="store_true")
    _add_config_args(b_inc)

    b_ft = bench_sub.add_parser(
        "fine-tune", help="pretrained vs fine-tuned encoders on products the training never saw",
        description="amazon-google: two folds by connected component of the match pairs; fine-tune the text "
                    "encoder on one fold's pairs, measure on the other fold's products in the whole pooled catalog "
                    "(content only and default), medians over the folds. grocery: fine-tune on the train split's "
                    "groups, measure with the val split's listings as queries in a catalog of both splits.")
    b_ft.add_argument("--dataset", choices=["amazon-google", "grocery"], required=True)
    b_ft.add_argument("--data", required=True, metavar="DIR", help="the dataset's folder")
    b_ft.add_argument("--work", default="out/bench-fine-tune", metavar="DIR", help="scratch folder for tables and models")
    b_ft.add_argument("--modalities", default="image", metavar="LIST",
                      help="grocery: the encoders to fine-tune, comma-separated (image, text)")
    b_ft.add_argument("--json", action="store_true")
    _add_config_args(b_ft)

    ev = sub.add_parser(
        "evaluate", help="recall@k and MRR of a neighbours table against labelled pairs",
        description="For labelled match pairs (both directions): recall@k (k in evaluate.cutoffs), MRR and "
                    "precision@k of the neighbours table; with --ablation, also each modality alone and fused, "
                    "recomputed from the run's catalog and embeddings tables.")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--output", metavar="DIR", help="a run's output folder (its neighbours table is evaluated)")
    which.add_argument("--neighbours", metavar="DIR", help="a neighbours Delta table (<output>/neighbours)")
    _add_pairs_args(ev, "without it (or empty), only coverage: rows with lists, list length, top score")
    ev.add_argument("--ablation", action="store_true", help="also each modality alone (re-runs the join)")
    ev.add_argument("--groups", action="store_true",
                    help="evaluate grouping instead: pairwise and B-cubed precision/recall/F1 against the labels, "
                         "for each threshold of evaluate.group_thresholds (needs --output and --pairs)")
    ev.add_argument("--write", default=None, metavar="YAML",
                    help="with --groups: write the threshold of the best pairwise F1 to this config file")
    ev.add_argument("--json", action="store_true")
    _add_config_args(ev)

    rp = sub.add_parser(
        "report", help="an HTML page to look at a run's neighbour lists",
        description="Writes a self-contained HTML report of a finished run: for sampled products, the product and "
                    "its neighbours side by side (thumbnails, titles, prices, a bar per neighbour splitting its score "
                    "into components), the score distribution and, with --pairs, the recall@K curve.")
    rp.add_argument("--output", required=True, metavar="DIR", help="a finished run's output folder")
    rp.add_argument("--sample", type=int, default=20, help="products to show (a deterministic sample)")
    rp.add_argument("--seed", type=int, default=0, help="which sample (same seed, same products)")
    _add_pairs_args(rp, "adds the recall@K curve")
    rp.add_argument("--html", default=None, metavar="FILE", help="where to write it (default: <output>/report.html)")
    _add_config_args(rp)

    fw = sub.add_parser(
        "fit-weights", help="learn join.weights from labelled pairs and write them to a config file",
        description="Fits the fused score's component weights on labelled pairs against hard negatives (the "
                    "candidates the joins find) and writes a YAML config that 'prodsim run --conf FILE' uses.")
    fw.add_argument("--output", required=True, metavar="DIR", help="a finished run's output folder")
    _add_pairs_args(fw, "required", required=True)
    fw.add_argument("--write", required=True, metavar="YAML", help="config file to write the weights to")
    _add_config_args(fw)

    gr = sub.add_parser(
        "group", help="group a run's listings of one product into <output>/groups",
        description="Connected components of the neighbour pairs scoring at least group.threshold (on Spark), "
                    "oversized components split again at higher thresholds (group.max_size), then average "
                    "linkage inside each component; one row per catalog row with its group.")
    gr.add_argument("--output", required=True, metavar="DIR", help="a finished run's output folder")
    gr.add_argument("--threshold", type=float, default=None, help="sets group.threshold")
    _add_config_args(gr)

    se = sub.add_parser(
        "search", help="rank a run's products for a table of shoppers' queries",
        description="Embeds each query (text, image or both; optional category and price filters) with the run's "
                    "encoders and ranks the run's products by fused score over the modalities the query has, "
                    "probing search.probe cells of the run's index; writes <output>/search (one row per query: "
                    "its results with per-component scores, or a reason).")
    se.add_argument("--output", required=True, metavar="DIR", help="a finished run's output folder")
    se.add_argument("--queries", required=True, metavar="PATH",
                    help="queries file or folder: query_id, text, image_uri, category, min_price, max_price "
                         "(CSV, Parquet, JSON Lines or Delta)")
    se.add_argument("--format", choices=CATALOG_FORMATS, default=None, help="the queries' format (default: from the path)")
    se.add_argument("--k", type=int, default=None, help="results per query (sets search.k)")
    _add_config_args(se)

    ft = sub.add_parser(
        "fine-tune", help="train a text or image encoder on the catalog's own matches",
        description="Fine-tunes the configured text encoder (contrastive, in-batch and hard negatives mined from the "
                    "run's neighbour lists) or image encoder (metric learning on groups of photos) on labelled "
                    "matches of a run's catalog, through Spark's TorchDistributor, and writes a model folder. The "
                    "overrides it prints (--json: 'set') make 'prodsim run'/'embed' use it; the new encoder id "
                    "re-encodes that modality for every product.")
    ft.add_argument("--modality", required=True, choices=["text", "image"])
    ft.add_argument("--run", required=True, metavar="DIR",
                    help="a prodsim output folder whose catalog table holds the labelled products")
    labels = ft.add_mutually_exclusive_group(required=True)
    labels.add_argument("--pairs", metavar="CSV", help="labelled match pairs (two id columns, a header)")
    labels.add_argument("--groups", metavar="CSV", help="labelled groups: an id column and a 'group' column")
    ft.add_argument("--model-out", required=True, metavar="MODEL_DIR", help="the model folder to write")
    ft.add_argument("--base", default=None, metavar="MODEL",
                    help="model to start from (default: embed.text.model, or embed.image.model with its weights); "
                         "any Hugging Face folder for text, a multilingual one included")
    ft.add_argument("--json", action="store_true", help="end with the result as one JSON object")
    _add_config_args(ft)
    return parser


def _config_from(args: argparse.Namespace, base_conf: list[Path] | None = None) -> ProdsimConfig:
    """The config of one command: defaults <- ``base_conf`` (a benchmark's own settings) <- --conf files
    <- --set overrides <- flags that set one key each (--format, --k). A flag and a --set of the same
    key that disagree are an error, not a silent override."""
    # an empty --conf "" (what a scheduler renders for an unset option) means no file
    args.conf = [c for c in args.conf if c and c.strip()]
    overrides = list(args.overrides)
    for flag, key in _FLAG_KEYS.items():
        if args.command == "search":  # its --format is the queries' format, its --k the results per query
            key = {"k": "search.k"}.get(flag)
            if key is None:
                continue
        value = getattr(args, flag, None)
        if value is None:
            continue
        for item in args.overrides:
            parts, set_value = parse_override(item)
            if ".".join(parts) == key and set_value != value:
                raise ConfigError(f"--{flag} {value} and --set {item} disagree; give one of them")
        overrides.append(f"{key}={value}")
    return load_config([*(base_conf or []), *args.conf], overrides)


def _precheck_catalog(path: str, config: ProdsimConfig) -> None:
    """Fail before Spark starts when the catalog is missing or lacks a required column."""
    from prodsim_spark import io
    from prodsim_spark.ingest import check_columns

    fmt = io.detect_format(path, config.ingest.format)
    columns = io.peek_columns(path, fmt, config.ingest)
    if columns is not None:
        check_columns(columns, config.ingest, path=path)


def _precheck_models(config: ProdsimConfig, modalities=("text", "image")) -> None:
    """Fail before Spark starts when an enabled encoder's model folder or weights file is missing."""
    from prodsim_spark import encoders

    if "text" in modalities and config.embed.text.enabled:
        encoders.text_encoder_id(config.embed.text)
    if "image" in modalities and config.embed.image.enabled:
        encoders.image_encoder_id(config.embed.image)


def _precheck_pairs(path: str | None) -> None:
    if path and not Path(path).is_file():
        raise InputError("labelled pairs file does not exist (--pairs)", path=path)


def cmd_run(args: argparse.Namespace) -> int:
    from prodsim_spark.pipeline import run_pipeline
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import RunTables

    config = _config_from(args)
    _precheck_catalog(args.catalog, config)
    _precheck_models(config)
    tables = RunTables.at(args.output)
    spark = get_session(config.spark)
    result = run_pipeline(spark, args.catalog, tables.output, config)
    print(f"\nprodsim run: {result.rows} catalog rows -> {tables.output}")
    print("  status:  " + ", ".join(f"{k} {v}" for k, v in result.status.items()))
    for code, count in result.reasons.items():
        print(f"  reason:  {code:<24} {count}")
    if result.embed:
        e = result.embed
        print(f"  embed:   {e['text_encoded']} texts and {e['image_encoded']} images encoded, "
              f"{e['image_failed']} images unreadable, {e['reused']} products reused, {e['removed']} removed")
    if result.join:
        print(f"  join:    {result.join['with_neighbours']} of {result.join['rows']} rows have neighbours")
    if result.groups:
        print(f"  groups:  {result.groups['groups']} groups, the largest of {result.groups['largest_group']}")
    for name, path in result.tables.items():
        print(f"  table:   {name:<12} {path}")
    if result.join:
        _print_samples(spark, tables)
    return 0


def _print_samples(spark, tables, n: int = 3) -> None:
    from pyspark.sql import functions as F

    from prodsim_spark.fusion import PARTS
    from prodsim_spark.tables import CATALOG, NEIGHBOURS, live_catalog

    title = {r["product_id"]: r["title"] for r in
             live_catalog(tables.read(spark, CATALOG)).select("product_id", "title").collect()}
    rows = (tables.read(spark, NEIGHBOURS).where(F.size("neighbours") > 0)
            .orderBy("source_row").limit(n).collect())
    print(f"\nsample neighbours (score: {' + '.join(PARTS)}):")
    for r in rows:
        print(f"  {r['product_id']} {title.get(r['product_id']) or ''!s:.40}")
        for nb in r["neighbours"][:3]:
            parts = " + ".join(f"{nb[c]:.2f}" for c in PARTS)
            print(f"      {nb['score']:.3f} = {parts}  {nb['product_id']} {title.get(nb['product_id']) or ''!s:.40}")


def cmd_stage(args: argparse.Namespace) -> int:
    """One stage of the pipeline on a run folder (what the per-stage spark-submit jobs and the DAG call)."""
    from prodsim_spark import pipeline
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import CATALOG, EMBEDDINGS, RunTables

    config = _config_from(args)
    if args.command == "ingest":
        _precheck_catalog(args.catalog, config)
    if args.command == "embed":
        _precheck_models(config)
    tables = RunTables.at(args.output)
    spark = get_session(config.spark)
    needs = {"ingest": (), "embed": (CATALOG,), "neighbours": (CATALOG, EMBEDDINGS)}[args.command]
    tables.require(spark, *needs)
    result = pipeline.RunResult(output=tables.output)
    if args.command == "ingest":
        result = pipeline.run_ingest(spark, args.catalog, tables.output, config)
        print(f"prodsim ingest: {result.rows} rows -> {tables.catalog}: "
              + ", ".join(f"{k} {v}" for k, v in result.status.items()))
    elif args.command == "embed":
        pipeline.run_embed(spark, tables.output, config, result)
        print(f"prodsim embed: {result.embed} -> {tables.embeddings}")
    else:
        pipeline.run_join(spark, tables.output, config, result)
        print(f"prodsim neighbours: {result.join['with_neighbours']} of {result.join['rows']} rows have "
              f"neighbours -> {tables.neighbours}")
    return 0


def _benchmarks_package():
    """The ``benchmarks`` package of this checkout: it lives beside the library, not in its wheel."""
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import benchmarks
    except ImportError:
        raise ConfigError("the benchmarks live in the repository's benchmarks/ folder, which the installed "
                          "package does not include: run 'prodsim bench' from a checkout") from None
    return benchmarks


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from prodsim_spark.session import get_session

    if args.bench is None:
        raise ConfigError("say what to benchmark: prodsim bench embed|join|quality|fine-tune|search|incremental")
    _benchmarks_package()
    if args.bench == "fine-tune":
        from benchmarks import datasets, finetune as bench_finetune

        config = _config_from(args, base_conf=[bench_finetune.DEFAULTS])
        datasets.check(args.dataset, Path(args.data))
        modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        if not modalities or set(modalities) - {"text", "image"}:
            raise ConfigError(f"--modalities {args.modalities!r}: a comma-separated list of text, image")
        spark = get_session(config.spark)
        if args.dataset == "amazon-google":
            result = bench_finetune.bench_amazon_google(spark, config, Path(args.data), Path(args.work))
        else:
            result = bench_finetune.bench_grocery(spark, config, Path(args.data), Path(args.work), modalities)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            from prodsim_spark.evaluate import markdown_table

            print(markdown_table(result["methods"]))
            print("training:", result["training"])
        return 0
    if args.bench == "quality":
        from benchmarks import datasets, quality

        config = _config_from(args, base_conf=[quality.DEFAULTS])
        datasets.check(args.dataset, Path(args.data))
        spark = get_session(config.spark)
        result = quality.bench_quality(spark, config, args.dataset, Path(args.data), Path(args.work))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            from prodsim_spark.evaluate import markdown_table

            print(markdown_table(result["methods"]))
            print("learned per fold:", [{**f["weights"], "same_source_penalty": f["same_source_penalty"]}
                                        for f in result["fits"]])
        return 0
    if args.bench == "search" and args.dataset:
        from benchmarks import datasets
        from benchmarks import search as bench_search

        if not args.data:
            raise ConfigError("--dataset needs --data DIR (the dataset's folder)", stage="bench search")
        if args.tuned_image and args.dataset != "grocery":
            raise ConfigError("--tuned-image is measured on --dataset grocery only (its listings have photos)",
                              stage="bench search")
        datasets.check(args.dataset, Path(args.data))
        config = _config_from(args)
        spark = get_session(config.spark)
        result = bench_search.bench_search_quality(spark, config, args.dataset, Path(args.data).resolve(),
                                                   Path(args.work), split=args.split, tuned_image=args.tuned_image)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            from prodsim_spark.evaluate import markdown_table

            for label, measured in (result["encoders"].items() if args.tuned_image else [("", result)]):
                for mode, methods in measured["methods"].items():
                    print(f"{mode} queries{', ' + label + ' encoders' if label else ''}:")
                    print(markdown_table(methods))
        return 0
    if args.bench == "search" and args.tuned_image:
        raise ConfigError("--tuned-image needs --dataset grocery --data DIR", stage="bench search")
    config = _config_from(args)
    spark = get_session(config.spark)
    if args.bench == "search":
        from benchmarks import search as bench_search

        result = bench_search.bench_search(spark, config, n=args.n, queries=args.queries, d=args.d, sample=args.sample)
        print(json.dumps(result, indent=2) if args.json else result)
        return 0
    if args.bench == "incremental":
        from benchmarks import incremental as bench_incremental

        result = bench_incremental.bench_incremental(spark, config, n=args.n, changed=args.changed, d=args.d,
                                                     work=Path(args.work))
        print(json.dumps(result, indent=2) if args.json else result)
        return 0
    if args.bench == "join":
        from benchmarks import join as bench_join

        if args.scaling:
            result = bench_join.bench_scaling(spark, config, sizes=args.sizes, sample=args.sample)
        else:
            mllib = {"auto": None, "yes": True, "no": False}[args.mllib]
            result = bench_join.bench_join(spark, config, n=args.n, d=args.d, sample=args.sample, mllib=mllib,
                                           mllib_bucket_length=args.mllib_bucket_length,
                                           mllib_tables=args.mllib_tables, repeats=args.repeats)
        print(json.dumps(result, indent=2) if args.json else result)
        return 0
    from benchmarks import datasets
    from benchmarks import embed as bench_embed

    result = bench_embed.bench_embed(spark, config, rows=args.rows, image_rows=args.image_rows, repeats=args.repeats)
    if args.runtimes == "yes":
        folder = {name: Path(getattr(args, name.replace("-", "_"))) for name in ("amazon-google", "grocery")}
        found = {}
        for name, path in folder.items():
            try:
                datasets.check(name, path)
                found[name] = path.resolve()
            except InputError as exc:
                log.warning("bench embed: no %s quality figure for the runtimes: %s", name, exc)
        result["runtimes"] = bench_embed.bench_runtimes(
            spark, config, rows=args.rows, image_rows=args.image_rows, repeats=args.repeats,
            amazon_google=found.get("amazon-google"), grocery=found.get("grocery"), work=Path(args.work))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for kind in ("text", "image"):
            if kind in result:
                r = result[kind]
                print(f"{kind:<6} {r['rows']:>6} rows  spark {r['rows_per_s_spark']:>8.1f}/s  "
                      f"bare {r['rows_per_s_bare']:>8.1f}/s  ratio {r['ratio']:.3f}")
        for name, figures in result.get("runtimes", {}).items():
            print(f"runtime {name:<10} " + "  ".join(f"{k} {v}" for k, v in figures.items()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from prodsim_spark import evaluate, io, pipeline
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import NEIGHBOURS, RunTables

    config = _config_from(args)
    _precheck_pairs(args.pairs)
    if args.ablation and not args.pairs:
        raise ConfigError("--ablation needs --pairs")
    if args.groups:
        return _evaluate_groups(args, config)
    if args.write:
        raise ConfigError("--write goes with --groups")
    if args.output:
        tables, name = RunTables.at(args.output), NEIGHBOURS
    else:  # a neighbours table by its path: its run folder is the folder that holds it
        tables = RunTables.of_table(args.neighbours)
        name = args.neighbours.rstrip("/").rsplit("/", 1)[-1]
    spark = get_session(config.spark)
    neighbours = tables.read(spark, name)
    if not args.pairs:
        found = evaluate.coverage(neighbours)
        print(json.dumps(found, indent=2) if args.json else
              "\n".join(f"{k:<30} {v}" for k, v in found.items()))
        return 0
    pairs = io.read_pairs(spark, args.pairs, args.left_col, args.right_col)
    cutoffs = config.evaluate.cutoffs
    results = {"neighbours table": evaluate.metrics(neighbours, pairs, cutoffs=cutoffs)}
    if args.ablation:
        products = pipeline.run_products(spark, tables.output, config)
        for method, lists in evaluate.ablations(products, config).items():
            results[method] = evaluate.metrics(lists, pairs, cutoffs=cutoffs)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(evaluate.markdown_table(results))
    return 0


def _evaluate_groups(args: argparse.Namespace, config: ProdsimConfig) -> int:
    """evaluate --groups: each swept threshold groups the run anew (nothing written but --write's file)."""
    import json

    from prodsim_spark import evaluate, groups, io, pipeline
    from prodsim_spark.config import with_overrides, write_config
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import CATALOG, EMBEDDINGS, NEIGHBOURS, RunTables

    if not (args.output and args.pairs):
        raise ConfigError("--groups needs --output (a finished run) and --pairs (labelled pairs or groups)")
    tables = RunTables.at(args.output)
    spark = get_session(config.spark)
    tables.require(spark, CATALOG, EMBEDDINGS, NEIGHBOURS)
    truth = (io.read_groups(spark, args.pairs) if "group" in io.csv_header(args.pairs)
             else groups.label_groups(io.read_pairs(spark, args.pairs, args.left_col, args.right_col))).persist()
    products = pipeline.run_products(spark, tables.output, config)
    sweep = {}
    for threshold in config.evaluate.group_thresholds:
        at = with_overrides(config, [f"group.threshold={threshold}"])
        table, _, counts = pipeline.group_products(spark, tables.output, at, products)
        sweep[str(threshold)] = {**evaluate.group_metrics(table, truth), "components_split": counts["components_split"]}
        log.info("[evaluate] group.threshold %.2f: %s", threshold, sweep[str(threshold)])
    best = max(sweep, key=lambda t: (sweep[t]["pairwise_f1"], -float(t)))
    result = {"thresholds": sweep, "best_threshold": float(best), "best": sweep[best]}
    if args.write:
        write_config(args.write, {"group": {"threshold": float(best)}},
                     f"group.threshold fitted by 'prodsim evaluate --groups' on {args.pairs} (pairwise F1 "
                     f"{sweep[best]['pairwise_f1']});\nuse with: prodsim run --conf {args.write} ...")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cols = ["pairwise_precision", "pairwise_recall", "pairwise_f1", "bcubed_f1", "groups", "largest_group"]
        print("| group.threshold | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
        for t, m in sweep.items():
            print(f"| {t} | " + " | ".join(str(m[c]) for c in cols) + " |")
        print(f"best pairwise F1 at group.threshold {best}" + (f": written to {args.write}" if args.write else ""))
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    from prodsim_spark import pipeline
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import RunTables

    config = _config_from(args)
    tables = RunTables.at(args.output)
    spark = get_session(config.spark)
    result = pipeline.run_group(spark, tables.output, config, pipeline.RunResult(output=tables.output))
    g = result.groups
    print(f"prodsim group: {g['groups']} groups (largest {g['largest_group']}), {g['components_split']} of "
          f"{g['components']} components split by the chaining guard -> {tables.groups}")
    return 0


def cmd_fit_weights(args: argparse.Namespace) -> int:
    import json

    from prodsim_spark import evaluate, io, pipeline, weights
    from prodsim_spark.config import write_config
    from prodsim_spark.session import get_session

    config = _config_from(args)
    _precheck_pairs(args.pairs)
    spark = get_session(config.spark)
    pairs = io.read_pairs(spark, args.pairs, args.left_col, args.right_col)
    products = pipeline.run_products(spark, args.output, config)
    report = weights.fit_on_lists(products, evaluate.ablations(products, config), pairs, config)
    write_config(args.write, weights.fitted_config(report),
                 f"join.weights, join.same_source_penalty and join.hubness fitted by 'prodsim fit-weights' on {args.pairs} "
                 f"({report['queries']} labelled products);\nuse with: prodsim run --conf {args.write} ...")
    print(json.dumps(report, indent=2))
    print(f"weights written to {args.write}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from prodsim_spark import io, report
    from prodsim_spark.progress import stage
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import CATALOG, GROUPS, NEIGHBOURS, RunTables

    config = _config_from(args)
    if args.sample < 1:
        raise ConfigError(f"--sample {args.sample}: give at least 1 product")
    _precheck_pairs(args.pairs)
    tables = RunTables.at(args.output)
    spark = get_session(config.spark)
    tables.require(spark, CATALOG, NEIGHBOURS)
    target = args.html or tables.report_html
    with stage(spark, "report", f"{args.sample} sampled products -> {target}"):
        pairs = io.read_pairs(spark, args.pairs, args.left_col, args.right_col) if args.pairs else None
        groups = tables.read(spark, GROUPS) if tables.exists(spark, GROUPS) else None
        data = report.collect_report(tables.read(spark, CATALOG), tables.read(spark, NEIGHBOURS),
                                     output=tables.output, sample=args.sample, seed=args.seed, pairs=pairs,
                                     groups=groups)
        page = report.render_html(data)
        report.write_html(page, target)
    print(f"prodsim report: {len(data.samples)} products with their neighbours, {len(page) // 1024} KiB -> {target}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from prodsim_spark import io, pipeline
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import RunTables

    config = _config_from(args)
    io.detect_format(args.queries, args.format or "auto", what="queries", stage="search")
    if io.local_path(args.queries) is not None and not io.local_path(args.queries).exists():
        raise InputError("no such file or folder (--queries)", stage="search", path=args.queries)
    _precheck_models(config)
    tables = RunTables.at(args.output)
    spark = get_session(config.spark)
    counts = pipeline.run_search(spark, args.queries, tables.output, config, fmt=args.format)
    print(f"prodsim search: {counts['queries']} queries, {counts['with_results']} with results, "
          f"{counts['rejected']} rejected -> {tables.search}")
    return 0


def cmd_fine_tune(args: argparse.Namespace) -> int:
    import json

    from prodsim_spark import finetune, groups, io
    from prodsim_spark.progress import stage
    from prodsim_spark.session import get_session
    from prodsim_spark.tables import CATALOG, EMBEDDINGS, NEIGHBOURS, RunTables

    config = _config_from(args)
    labels = args.pairs or args.groups
    _precheck_pairs(labels)
    if args.base is None:
        _precheck_models(config, [args.modality])
    tables = RunTables.at(args.run)
    spark = get_session(config.spark)
    tables.require(spark, CATALOG)
    catalog = tables.read(spark, CATALOG)
    bridge_texts = None
    with stage(spark, "fine-tune", f"{args.modality} encoder on {labels} -> {args.model_out}"):
        if args.modality == "text":
            neighbours = tables.read(spark, NEIGHBOURS) if tables.exists(spark, NEIGHBOURS) else None
            rows, not_found = finetune.text_training_rows(catalog, io.read_pairs(spark, labels), neighbours, config)
        else:
            groups = (io.read_groups(spark, args.groups) if args.groups
                      else groups.label_groups(io.read_pairs(spark, args.pairs)))
            rows, not_found = finetune.image_training_rows(catalog, groups)
            if config.finetune.image.text_bridge and tables.exists(spark, EMBEDDINGS):
                bridge_texts = finetune.bridge_rows(tables.read(spark, EMBEDDINGS), groups)
        result = finetune.fine_tune(spark, args.modality, rows, not_found, config, args.model_out, args.base,
                                    bridge_texts=bridge_texts)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"prodsim fine-tune: {args.modality} model -> {result['model_dir']} (loss per epoch "
              f"{result['loss_per_epoch']}, {result['train_s']:.0f} s; {result['ids_not_found']} labelled ids "
              f"{finetune.missing_ids(args.modality)})")
        print("use it with: " + " ".join(f"--set {shlex.quote(item)}" for item in result["set"]))
    return 0


COMMANDS = {"run": cmd_run, "ingest": cmd_stage, "embed": cmd_stage, "neighbours": cmd_stage, "bench": cmd_bench,
            "evaluate": cmd_evaluate, "fit-weights": cmd_fit_weights, "report": cmd_report,
            "fine-tune": cmd_fine_tune, "search": cmd_search, "group": cmd_group}

# a ProdsimError raised inside a Spark task reaches the driver as the text of a PythonException
_TASK_ERROR = re.compile(r"prodsim_spark\.errors\.(\w+): (.+)")


def _error_from_task(exc: Exception) -> ProdsimError | None:
    """The ProdsimError a Python worker raised (e.g. a weights file that does not fit the model), or None."""
    from prodsim_spark import errors

    if type(exc).__name__ != "PythonException":
        return None
    found = _TASK_ERROR.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    error = getattr(errors, name, ProdsimError)(message.strip())
    return error if isinstance(error, ProdsimError) else None


def main(argv: list[str] | None = None) -> int:
    from prodsim_spark.progress import set_progress, setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return _EXIT_USAGE
    name = args.command + (f" {args.bench}" if getattr(args, "bench", None) else "")
    setup_logging(args.log_level)
    set_progress(getattr(args, "progress", "off"))
    try:
        return COMMANDS[args.command](args)
    except ProdsimError as exc:
        print(f"prodsim {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        error = _error_from_task(exc)
        if error is None:
            raise
        print(f"prodsim {name}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
