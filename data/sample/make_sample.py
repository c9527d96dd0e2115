#!/usr/bin/env python3
"""Build the bundled sample catalog from the Grocery Store Dataset (Klasson et al., MIT licence).

usage: make_sample.py GROCERY_DATASET_DIR OUT_DIR

The output is committed (catalog.csv, images/, groups.csv); this script records how it was made.
It draws on the dataset's *val* split only (the train split is kept for the quality benchmark):

* 81 catalogue products: the product's name, its catalogue description, brand and volume from the
  dataset's information files, its iconic image;
* ~220 shop listings made from the in-store photos: a title written the way sellers write them
  (shortened, re-ordered, lower-cased), the coarse category, a photo for most of them;
* a few rows that are wrong on purpose, so the sample run shows validation at work: a duplicate
  id, a missing id, an empty row, an "n/a" price, a "$1,299.00" price, a missing and a corrupt image.

Prices are made up by this script (per product a base price, per listing +-10%): the dataset has none.
Images are shrunk to at most 256 px to keep the repository small.
"""
import csv
import hashlib
import random
import re
import sys
from pathlib import Path

from PIL import Image

MAX_SIDE = 256


def shrink(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((MAX_SIDE, MAX_SIDE))
        im.save(dst, "JPEG", quality=80, optimize=True)


def info_fields(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="ignore").splitlines():
            if ":" in line and not line.startswith(" "):
                key, value = line.split(":", 1)
                out[key.strip().lower()] = value.strip()
    return out


def main(root: Path, out: Path, seed: int = 11) -> None:
    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    classes = list(csv.DictReader(open(root / "classes.csv", encoding="utf-8")))
    rows, groups = [], []
    base_price, names, brands, cats = {}, {}, {}, {}
    for c in classes:
        cid = int(c["Class ID (int)"])
        iconic = root / c["Iconic Image Path (str)"].lstrip("/")
        folder = iconic.parent
        top = c["Iconic Image Path (str)"].split("/")[2]  # Fruit, Packages, Vegetables
        kind = c["Coarse Class Name (str)"].replace("-", " ")
        name = c["Class Name (str)"].replace("-", " ")
        info = info_fields(folder / f"{c['Class Name (str)']}_Information.txt")
        maker = info.get("manufacturer and volume", "")
        brand, volume = (maker.split(",", 1) + [""])[:2] if maker else ("", "")
        volume = volume.strip() or (info.get("country and volume", ",").split(",", 1) + [""])[1].strip()
        brand = brand.strip().title() if top == "Packages" else ""
        desc_path = root / c["Product Description Path (str)"].lstrip("/")
        desc = desc_path.read_text(encoding="utf-8", errors="ignore").strip() if desc_path.exists() else ""
        desc = re.sub(r"\s+", " ", desc)[:500]
        price = round(rng.uniform(0.8, 4.5) if top != "Packages" else rng.uniform(1.2, 3.9), 2)
        base_price[cid], names[cid], brands[cid], cats[cid] = price, name, brand, f"{top} > {kind}"
        pid = f"G{cid:03d}"
        shrink(iconic, images / f"{pid}.jpg")
        title = f"{name} {volume}".strip()
        rows.append(dict(product_id=pid, title=title, description=desc, brand=brand, category=f"{top} > {kind}",
                         price=f"{price:.2f}", image_uri=f"images/{pid}.jpg"))
        groups.append((pid, cid))

    photos = [line.split(",") for line in open(root / "val.txt", encoding="utf-8")]
    rng.shuffle(photos)
    for rel, fine_id, _ in photos[:220]:
        cid = int(fine_id)
        pid = "L" + hashlib.sha1(rel.strip().encode()).hexdigest()[:10]
        words = names[cid].split()
        style = rng.random()
        if style < 0.4:
            title = names[cid].lower()
        elif style < 0.7:
            title = " ".join(words[-2:]) if len(words) > 2 else names[cid]
        elif style < 0.85:
            title = f"{cats[cid].split(' > ')[1]} - {names[cid]}"
        else:
            title = ""  # photo-only listing
        u = rng.random()
        image = ""
        if u < 0.8 or not title:
            shrink(root / rel.strip(), images / f"{pid}.jpg")
            image = f"images/{pid}.jpg"
        price = base_price[cid] * rng.uniform(0.9, 1.1)
        rows.append(dict(product_id=pid, title=title, description="", brand=brands[cid] if rng.random() < 0.5 else "",
                         category=cats[cid] if rng.random() < 0.7 else "", price=f"{price:.2f}", image_uri=image))
        groups.append((pid, cid))

    # rows that are wrong on purpose (see the module docstring)
    bad = Path(images / "X900.jpg")
    bad.write_bytes((images / "G000.jpg").read_bytes()[:600])  # a truncated JPEG
    rows += [
        dict(rows[5], title=rows[5]["title"] + " (relisted)"),  # duplicate product_id
        dict(product_id="", title="Organic bananas 1kg", description="", brand="", category="Fruit > Banana",
             price="1.99", image_uri=""),
        dict(product_id="", title="", description="", brand="", category="", price="", image_uri=""),
        dict(product_id="X901", title="Gift basket, assorted fruit", description="Seasonal fruit in a wicker basket",
             brand="", category="Fruit > Gift", price="n/a", image_uri=""),
        dict(product_id="X902", title="Fruit crate, wholesale (200 kg)", description="Mixed fruit for shops",
             brand="", category="Fruit > Wholesale", price="$1,299.00", image_uri=""),
        dict(product_id="X903", title="Red apples", description="", brand="", category="Fruit > Apple",
             price="2.10", image_uri="images/does-not-exist.jpg"),
        dict(product_id="X900", title="Golden apples", description="", brand="", category="Fruit > Apple",
             price="2.30", image_uri="images/X900.jpg"),
    ]
    with open(out / "catalog.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "groups.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "group"])
        w.writerows(groups)
    print(f"{len(rows)} rows, {len(list(images.iterdir()))} images -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
