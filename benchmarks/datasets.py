"""The labelled benchmark datasets, built from a checkout's ``../shared/data`` into a work folder as a
catalog CSV (canonical columns) plus a pairs CSV of true matches."""
from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

from prodsim_spark.config import ProdsimConfig
from prodsim_spark.errors import InputError
from prodsim_spark.pipeline import RunResult, run_embed, run_ingest, run_join
from prodsim_spark.tables import RunTables

log = logging.getLogger(__name__)

# the files each dataset's folder must hold
REQUIRED = {"amazon-google": ("Amazon.csv", "GoogleProducts.csv", "perfect_mapping.csv"),
            "grocery": ("make_listings.py", "dataset")}


def check(dataset: str, src: Path) -> None:
    """InputError naming what is missing when ``src`` is not ``dataset``'s folder (cheap: no Spark)."""
    if not src.is_dir():
        raise InputError(f"the {dataset} dataset folder does not exist (--data)", stage="bench quality",
                         path=str(src))
    missing = [name for name in REQUIRED[dataset] if not (src / name).exists()]
    if missing:
        raise InputError(f"not the {dataset} dataset: {', '.join(missing)} missing", stage="bench quality",
                         path=str(src))


def build(dataset: str, src: Path, out: Path) -> tuple[Path, Path]:
    """(catalog, pairs) of ``dataset`` read from ``src``, written under ``out``."""
    check(dataset, src)
    if dataset == "amazon-google":
        return amazon_google_catalog(src, out)
    return grocery_catalog(src, out)


def amazon_google_catalog(src: Path, out: Path) -> tuple[Path, Path]:
    """Amazon.csv + GoogleProducts.csv pooled into one catalog (ids prefixed amazon:/google:), and
    perfect_mapping.csv as pairs.csv. Returns (catalog, pairs) paths."""
    catalog = write_catalog(shop_rows(src, "amazon") + shop_rows(src, "google"), out)
    pairs = out / "pairs.csv"
    with open(pairs, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["left_id", "right_id"])
        w.writerows(amazon_google_matches(src))
    return catalog, pairs


SHOPS = {"amazon": ("Amazon.csv", "title"), "google": ("GoogleProducts.csv", "name")}


def shop_rows(src: Path, shop: str) -> list[dict]:
    """One shop's products as canonical catalog rows, ids prefixed ``amazon:`` / ``google:``."""
    name, title_col = SHOPS[shop]
    with open(src / name, newline="", encoding="latin-1") as f:
        return [{"product_id": f"{shop}:{r['id']}", "title": r[title_col], "description": r["description"],
                 "brand": r["manufacturer"], "category": "", "price": r["price"], "image_uri": ""}
                for r in csv.DictReader(f)]


def amazon_google_matches(src: Path) -> list[tuple[str, str]]:
    """perfect_mapping.csv as (amazon id, google id) pairs, prefixed."""
    with open(src / "perfect_mapping.csv", newline="", encoding="utf-8") as f:
        return [("amazon:" + r["idAmazon"], "google:" + r["idGoogleBase"]) for r in csv.DictReader(f)]


def write_catalog(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    catalog = out / "catalog.csv"
    with open(catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return catalog


def amazon_catalog_and_google_queries(src: Path, out: Path) -> tuple[Path, list[dict]]:
    """The Amazon products as a catalog, and each Google product with a match as a search query (its
    title; relevant: its Amazon matches)."""
    check("amazon-google", src)
    matches: dict[str, set] = {}
    for amazon, google in amazon_google_matches(src):
        matches.setdefault(google, set()).add(amazon)
    queries = [{"query_id": r["product_id"], "text": r["title"], "relevant": matches[r["product_id"]]}
               for r in shop_rows(src, "google") if r["product_id"] in matches]
    return write_catalog(shop_rows(src, "amazon"), out), queries


def grocery_catalog(src: Path, out: Path, split: str = "train") -> tuple[Path, Path]:
    """The grocery listings catalog, made by the dataset's own make_listings.py."""
    if not (out / "catalog.csv").exists():
        done = subprocess.run([sys.executable, str(src / "make_listings.py"), str(src / "dataset"), split, str(out)],
                              check=True, capture_output=True, text=True)  # stdout stays clean for --json
        log.info("[bench quality] %s", done.stdout.strip())
    return out / "catalog.csv", out / "pairs.csv"


def grocery_known_products(src: Path, out: Path) -> tuple[Path, Path, Path, list[str]]:
    """A shop's normal case: the train split's listings (the products it knows) plus the val split's
    (new photos and listings of those products) in one catalog. Returns (catalog, groups, pairs, the val
    listings' ids): fine-tune on the train listings' groups, measure with the val listings as queries."""
    check("grocery", src)
    parts = {split: grocery_catalog(src, out / split, split)[0].parent for split in ("train", "val")}
    catalog, groups, pairs = out / "catalog.csv", out / "groups.csv", out / "pairs.csv"
    val_ids = [r["product_id"] for r in csv.DictReader(open(parts["val"] / "catalog.csv", encoding="utf-8"))]
    if not catalog.exists():
        for name, target in (("catalog.csv", catalog), ("groups.csv", groups)):
            with open(target, "w", newline="", encoding="utf-8") as f:
                for i, split in enumerate(("train", "val")):
                    lines = (parts[split] / name).read_text(encoding="utf-8").splitlines(keepends=True)
                    f.writelines(lines if i == 0 else lines[1:])  # one header
        members: dict[str, list[str]] = {}
        for r in csv.DictReader(open(groups, encoding="utf-8")):
            members.setdefault(r["group"], []).append(r["product_id"])
        with open(pairs, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["left_id", "right_id"])
            for ids in members.values():
                w.writerows((a, b) for i, a in enumerate(ids) for b in ids[i + 1:])
    return catalog, groups, pairs, val_ids


def run_catalog(spark, catalog: Path, output: Path, config: ProdsimConfig, *, neighbours: bool = True) -> RunTables:
    """ingest + embed (+ the neighbours table) of ``catalog`` into ``output``."""
    tables = RunTables.at(str(output))
    result = run_ingest(spark, str(catalog), tables.output, config)
    run_embed(spark, tables.output, config, result)
    if neighbours:
        run_join(spark, tables.output, config, RunResult(output=tables.output))
    return tables
