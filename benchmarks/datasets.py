"""The labelled benchmark datasets, built from a checkout's ``../shared/data`` into a work folder as a
catalog CSV (canonical columns) plus a pairs CSV of true matches."""
from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

from prodsim_spark.errors import InputError

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
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, prefix, title_col in (("Amazon.csv", "amazon:", "title"), ("GoogleProducts.csv", "google:", "name")):
        with open(src / name, newline="", encoding="latin-1") as f:
            for r in csv.DictReader(f):
                rows.append({"product_id": prefix + r["id"], "title": r[title_col], "description": r["description"],
                             "brand": r["manufacturer"], "category": "", "price": r["price"], "image_uri": ""})
    catalog = out / "catalog.csv"
    with open(catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pairs = out / "pairs.csv"
    with open(src / "perfect_mapping.csv", newline="", encoding="utf-8") as f, open(pairs, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["left_id", "right_id"])
        for r in csv.DictReader(f):
            w.writerow(["amazon:" + r["idAmazon"], "google:" + r["idGoogleBase"]])
    return catalog, pairs


def grocery_catalog(src: Path, out: Path, split: str = "train") -> tuple[Path, Path]:
    """The grocery listings catalog, made by the dataset's own make_listings.py."""
    if not (out / "catalog.csv").exists():
        done = subprocess.run([sys.executable, str(src / "make_listings.py"), str(src / "dataset"), split, str(out)],
                              check=True, capture_output=True, text=True)  # stdout stays clean for --json
        log.info("[bench quality] %s", done.stdout.strip())
    return out / "catalog.csv", out / "pairs.csv"
