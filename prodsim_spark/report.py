"""Report stage: a self-contained HTML page to look at a run's neighbour lists.

For a deterministic sample of products it shows the product and its neighbours side by side
(thumbnail, title, brand, price) with a bar per neighbour that splits its score into the component
contributions (text, image, lexical, brand, category, price: they add up to the score). Plots of
the score distribution and, when labelled pairs are given, the recall@K curve are embedded as PNGs,
thumbnails as small JPEGs, so the one file can be mailed or attached to a ticket.

Two steps, as elsewhere: :func:`collect_report` runs on Spark and brings back only small things
(the sample, histograms, counts); :func:`render_html` is pure Python on those.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from prodsim_spark import evaluate
from prodsim_spark.fusion import PARTS
from prodsim_spark.io import read_bytes
from prodsim_spark.tables import live_catalog, neighbours_counts

log = logging.getLogger(__name__)

# one colour per component, used by the bars, the legend and the plots
COLOURS = {"text": "#4e79a7", "image": "#f28e2b", "lexical": "#59a14f", "brand": "#b07aa1",
           "category": "#9c755f", "price": "#e15759", "same_source": "#79706e"}
BINS = 40
INFO_COLUMNS = ("product_id", "title", "brand", "category", "price", "image_uri")


@dataclass
class ReportData:
    """What the page shows; small enough for the driver whatever the catalog's size."""
    output: str
    rows: int
    with_neighbours: int
    status: dict[str, int]
    reasons: dict[str, int]
    samples: list[dict]                       # {product: info, neighbours: [info + score + parts]}
    top1_hist: list[int]                      # counts of the first neighbour's score, BINS bins over [lo, hi]
    all_hist: list[int]                       # counts of every listed neighbour's score
    hist_range: tuple[float, float]
    component_means: dict[str, float]         # mean contribution of each component over listed neighbours
    without_neighbours: list[dict] = field(default_factory=list)  # a few rows with no list, with reasons
    recall_curve: list[tuple[int, float]] | None = None            # (k, recall@k) when pairs are given
    pairs_queries: int = 0
    groups: list[dict] = field(default_factory=list)  # sampled groups: {group_id, size, min/max edge, members}
    group_counts: dict = field(default_factory=dict)  # groups, of 2 or more, the largest


GROUP_MEMBERS_SHOWN = 12


def collect_groups(catalog: DataFrame, groups: DataFrame, *, sample: int, seed: int) -> tuple[list[dict], dict]:
    """A deterministic sample of groups of two or more (members with their catalog fields, at most
    GROUP_MEMBERS_SHOWN each, the representative first) and the group counts."""
    live = groups.where(F.col("group_id").isNotNull())
    sizes = live.groupBy("group_id").agg(F.count("*").alias("size"))
    counts = sizes.agg(F.count("*").alias("groups"), F.sum(F.when(F.col("size") > 1, 1).otherwise(0)).alias("multi"),
                       F.max("size").alias("largest")).first()
    picked = [r["group_id"] for r in sizes.where("size > 1").orderBy(F.xxhash64("group_id", F.lit(seed)), "group_id")
              .limit(sample).collect()]
    rows = (live.where(F.col("group_id").isin(picked))
            .join(live_catalog(catalog).select(*INFO_COLUMNS), "product_id").collect()) if picked else []
    out = []
    for gid in picked:
        members = sorted((r.asDict() for r in rows if r["group_id"] == gid),
                         key=lambda r: (r["product_id"] != r["representative"], r["product_id"]))
        if members:
            out.append({"group_id": gid, "size": members[0]["group_size"], "min_edge": members[0]["min_edge_score"],
                        "max_edge": members[0]["max_edge_score"], "members": members[:GROUP_MEMBERS_SHOWN]})
    return out, {"groups": int(counts["groups"] or 0), "of_two_or_more": int(counts["multi"] or 0),
                 "largest": int(counts["largest"] or 0)}


def collect_report(catalog: DataFrame, neighbours: DataFrame, *, output: str = "", sample: int = 20, seed: int = 0,
                   pairs: DataFrame | None = None, groups: DataFrame | None = None, group_sample: int = 8) -> ReportData:
    """Everything the page needs, aggregated on Spark (``groups``: the run's groups table, when it has one)."""
    counts = neighbours_counts(neighbours)
    status = {r["status"]: r["count"] for r in neighbours.groupBy("status").count().orderBy("status").collect()}
    reasons = {r["code"]: r["count"] for r in neighbours.where(F.col("reason").isNotNull())
               .select(F.explode(F.split("reason", ";")).alias("code")).groupBy("code").count()
               .orderBy(F.desc("count"), "code").collect()}

    listed = neighbours.select("product_id", F.posexplode("neighbours").alias("pos", "nb"))
    stats = listed.agg(F.min("nb.score").alias("lo"), F.max("nb.score").alias("hi"),
                       *[F.avg(f"nb.{c}").alias(c) for c in PARTS]).first()
    lo = math.floor(min(stats["lo"] if stats["lo"] is not None else 0.0, 0.0) * 10) / 10
    hi = math.ceil(max(stats["hi"] if stats["hi"] is not None else 1.0, 1e-6) * 10) / 10
    hist_range = (lo, max(hi, lo + 0.1))
    top1_hist, all_hist = _histograms(listed, *hist_range)

    picked = (neighbours.where(F.size("neighbours") > 0)
              .orderBy(F.xxhash64(F.col("product_id"), F.lit(seed)), "product_id").limit(sample)
              .select("product_id", "neighbours").collect())
    wanted = {r["product_id"] for r in picked} | {nb["product_id"] for r in picked for nb in r["neighbours"]}
    info = {r["product_id"]: r.asDict() for r in
            live_catalog(catalog).where(F.col("product_id").isin(list(wanted)))
            .select(*INFO_COLUMNS).collect()} if wanted else {}
    # a neighbour: its catalog fields, plus its score and the score's parts (kept apart: the parts
    # "brand", "category", "price" share names with catalog fields)
    samples = [{"product": info.get(r["product_id"], {"product_id": r["product_id"]}),
                "neighbours": [{**info.get(nb["product_id"], {"product_id": nb["product_id"]}),
                                "score": nb["score"], "parts": {c: nb[c] for c in PARTS}}
                               for nb in r["neighbours"]]} for r in picked]
    without = [r.asDict() for r in neighbours.where(F.size("neighbours") == 0)
               .orderBy("source_row").select("product_id", "source_row", "status", "reason").limit(10).collect()]

    curve, queries = None, 0
    if pairs is not None:
        ranks = evaluate.match_ranks(neighbours, pairs)
        queries = ranks.count()
        firsts = {r["first_rank"]: r["count"] for r in
                  ranks.where("first_rank IS NOT NULL").groupBy("first_rank").count().collect()}
        longest = neighbours.agg(F.max(F.size("neighbours"))).first()[0] or 0
        found, curve = 0, []
        for k in range(1, longest + 1):
            found += firsts.get(k, 0)
            curve.append((k, found / queries if queries else 0.0))
    sampled_groups, group_counts = (collect_groups(catalog, groups, sample=group_sample, seed=seed)
                                    if groups is not None else ([], {}))
    log.info("[report] %d rows, %d sampled products, %d distinct products shown, %d groups", counts["rows"],
             len(samples), len(wanted), len(sampled_groups))
    return ReportData(output=output, rows=counts["rows"], with_neighbours=counts["with_neighbours"],
                      groups=sampled_groups, group_counts=group_counts,
                      status=status, reasons=reasons, samples=samples, top1_hist=top1_hist, all_hist=all_hist,
                      hist_range=hist_range,
                      component_means={c: float(stats[c] or 0.0) for c in PARTS},
                      without_neighbours=without, recall_curve=curve, pairs_queries=int(queries))


def _histograms(listed: DataFrame, lo: float, hi: float) -> tuple[list[int], list[int]]:
    """Counts per score bin of the first neighbours and of every neighbour, in one pass."""
    width = (hi - lo) / BINS
    binned = listed.select(
        F.least(F.lit(BINS - 1), F.greatest(F.lit(0), F.floor((F.col("nb.score") - lo) / width))).cast("int").alias("b"),
        (F.col("pos") == 0).alias("first")).groupBy("b", "first").count().collect()
    top1, every = [0] * BINS, [0] * BINS
    for r in binned:
        every[r["b"]] += int(r["count"])
        if r["first"]:
            top1[r["b"]] += int(r["count"])
    return top1, every


# ---------------------------------------------------------------- rendering (no Spark below)

THUMBNAIL_MAX_BYTES, THUMBNAIL_TIMEOUT_S = 20_000_000, 5.0


def thumbnail(uri: str | None, size: int = 120) -> str | None:
    """A JPEG data URI of the image scaled to fit ``size`` px, or None when it cannot be read (within
    a deadline: the catalog's image_uri passed ingest's image policy, but the file may still block)."""
    if not uri:
        return None
    from PIL import Image

    try:
        data = read_bytes(uri, THUMBNAIL_MAX_BYTES, THUMBNAIL_TIMEOUT_S)
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))  # JPEGs decode at a reduced scale: a big photo costs little
            im.thumbnail((size, size))
            rgb = im.convert("RGBA")
            canvas = Image.new("RGBA", rgb.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgb)
            buf = io.BytesIO()
            canvas.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception as exc:  # a report must not fail on one bad image; the card says so instead
        log.debug("[report] no thumbnail for %s: %s", uri, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plots(data: ReportData) -> dict[str, str]:
    """The embedded plots, as PNG data URIs."""
    import matplotlib

    matplotlib.use("Agg")  # no display on executors, CI or servers
    import matplotlib.pyplot as plt

    out = {}
    lo, hi = data.hist_range
    edges = [lo + (hi - lo) * i / BINS for i in range(BINS)]
    width = (hi - lo) / BINS
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.bar(edges, data.all_hist, width=width, align="edge", color="#bab0ac", label="every listed neighbour")
    ax.bar(edges, data.top1_hist, width=width, align="edge", color="#4e79a7", alpha=0.85, label="first neighbour")
    ax.set_xlabel("fused score")
    ax.set_ylabel("neighbours")
    ax.set_title("Score distribution")
    ax.legend()
    out["scores"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 2.4))
    names = list(PARTS)
    ax.barh(names, [data.component_means[c] for c in names], color=[COLOURS[c] for c in names])
    ax.invert_yaxis()
    ax.set_xlabel("mean contribution to a neighbour's score")
    ax.set_title("What the scores are made of")
    out["components"] = _png(fig)

    if data.recall_curve:
        ks, rs = zip(*data.recall_curve)
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        ax.plot(ks, rs, marker="o", color="#4e79a7")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(list(ks))
        ax.grid(alpha=0.3)
        ax.set_title(f"Recall@K over {data.pairs_queries} labelled products")
        out["recall"] = _png(fig)
    return out


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _price(value) -> str:
    return "" if value is None else f"{value:,.2f}"


def _card(item: dict, thumbs: dict, extra: str = "", css: str = "card") -> str:
    src = thumbs.get(item.get("image_uri"))
    image = (f'<img class="thumb" src="{src}" alt="">' if src
             else f'<div class="thumb none">{"no image" if not item.get("image_uri") else "unreadable image"}</div>')
    meta = " · ".join(x for x in (_e(item.get("brand")), _e(item.get("category")), _price(item.get("price"))) if x)
    return (f'<div class="{css}" data-product-id="{_e(item.get("product_id"))}">{image}'
            f'<div class="title" title="{_e(item.get("title"))}">{_e(item.get("title")) or "<i>no title</i>"}</div>'
            f'<div class="meta">{meta}</div><div class="pid">{_e(item.get("product_id"))}</div>{extra}</div>')


def _score_bar(nb: dict) -> str:
    """A bar as wide as the score, split into the component contributions (negative parts are listed in the tooltip)."""
    parts = [(c, float(nb["parts"].get(c) or 0.0)) for c in PARTS]
    tip = "&#10;".join(f"{c}: {v:+.3f}" for c, v in parts)
    segments = "".join(
        f'<span class="seg" data-component="{c}" style="width:{max(v, 0) * 100:.1f}%;background:{COLOURS[c]}"></span>'
        for c, v in parts if v > 0)
    return (f'<div class="score" title="{tip}"><div class="bar">{segments}</div>'
            f'<span class="value">{float(nb["score"]):.3f}</span></div>')


def write_html(page: str, target: str) -> None:
    """Write the page to a local path or any URI fsspec knows (folders are created)."""
    import fsspec

    with fsspec.open(target, "w", encoding="utf-8") as f:
        f.write(page)


def render_html(data: ReportData, *, thumb_size: int = 120) -> str:
    """The whole page as one string: inline CSS, images and plots as data URIs, no external requests."""
    uris = {it.get("image_uri") for s in data.samples for it in [s["product"], *s["neighbours"]]}
    uris |= {m.get("image_uri") for g in data.groups for m in g["members"]}
    thumbs = {u: thumbnail(u, thumb_size) for u in sorted(u for u in uris if u)}
    figures = plots(data)
    legend = "".join(f'<span class="key"><span class="swatch" style="background:{COLOURS[c]}"></span>{c}</span>'
                     for c in PARTS)
    rows = []
    for s in data.samples:
        cards = "".join(_card(nb, thumbs, _score_bar(nb), "card neighbour") for nb in s["neighbours"])
        rows.append(f'<section class="product-row" data-product-id="{_e(s["product"].get("product_id"))}">'
                    f'{_card(s["product"], thumbs, "", "card query")}<div class="neighbours">{cards}</div></section>')
    status = ", ".join(f"{k} {v}" for k, v in data.status.items())
    reasons = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in data.reasons.items())
    without = "".join(f"<tr><td>{_e(r['product_id'])}</td><td>{_e(r['source_row'])}</td><td>{_e(r['status'])}</td>"
                      f"<td>{_e(r['reason'])}</td></tr>" for r in data.without_neighbours)
    figs = "".join(f'<figure><img class="plot" id="plot-{name}" src="{src}" alt="{name}"></figure>'
                   for name, src in figures.items())
    group_rows = []
    for g in data.groups:
        edges = "" if g["min_edge"] is None else f' · edge scores {g["min_edge"]:.3f}–{g["max_edge"]:.3f}'
        cards = "".join(_card(m, thumbs, '<div class="rep">representative</div>' if m["product_id"] == m["representative"]
                              else "", "card member") for m in g["members"])
        group_rows.append(f'<section class="group-row" data-group-id="{_e(g["group_id"])}"><div class="group-head">'
                          f'group {_e(g["group_id"])}: {g["size"]} listings{edges}</div>'
                          f'<div class="neighbours">{cards}</div></section>')
    gc = data.group_counts
    groups_html = (f'<h2>Groups ({len(data.groups)} sampled of {gc["of_two_or_more"]} with two or more listings; '
                   f'{gc["groups"]} groups, the largest of {gc["largest"]})</h2>{"".join(group_rows)}' if gc else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>prodsim report: {_e(data.output)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: 28px; }}
.summary td, .reasons td {{ padding: 2px 12px 2px 0; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; }}
.legend .key {{ margin-right: 14px; font-size: 13px; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }}
.product-row {{ display: flex; gap: 12px; padding: 10px 0; border-bottom: 1px solid #ddd; align-items: flex-start; }}
.neighbours {{ display: flex; gap: 8px; overflow-x: auto; }}
.card {{ width: 130px; flex: none; font-size: 12px; }}
.card.query {{ background: #f3f6fa; padding: 6px; border-radius: 4px; }}
.thumb {{ width: 120px; height: 120px; object-fit: contain; background: #fff; display: block; }}
.thumb.none {{ display: flex; align-items: center; justify-content: center; color: #999; border: 1px dashed #ccc; }}
.title {{ font-weight: 600; max-height: 3.6em; overflow: hidden; }}
.meta, .pid {{ color: #666; }}
.score {{ display: flex; align-items: center; gap: 4px; margin-top: 3px; }}
.bar {{ display: flex; width: 90px; height: 10px; background: #eee; }}
.seg {{ display: block; height: 100%; }}
.group-row {{ padding: 10px 0; border-bottom: 1px solid #ddd; }}
.group-head {{ font-weight: 600; margin-bottom: 6px; }} .rep {{ color: #4e79a7; font-weight: 600; }}
</style></head>
<body data-products="{len(data.samples)}">
<h1>prodsim report</h1>
<table class="summary">
<tr><td>run</td><td>{_e(data.output)}</td></tr>
<tr><td>catalog rows</td><td id="rows">{data.rows}</td></tr>
<tr><td>with neighbours</td><td id="with-neighbours">{data.with_neighbours}</td></tr>
<tr><td>status</td><td>{_e(status)}</td></tr>
</table>
<h2>Plots</h2><div class="figures">{figs}</div>
<h2>Products and their neighbours ({len(data.samples)} sampled)</h2>
<div class="legend">score bar: {legend}</div>
{''.join(rows)}
{groups_html}
<h2>Reasons</h2>
<table class="reasons"><tr><th>code</th><th>rows</th></tr>{reasons}</table>
<h2>Rows without neighbours (first {len(data.without_neighbours)})</h2>
<table class="reasons"><tr><th>product</th><th>input row</th><th>status</th><th>reason</th></tr>{without}</table>
<script>
// says in the DOM how many pictures the browser could decode (read by the report's browser test)
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesLoaded = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.dataset.imagesTotal = imgs.length;
}});
</script>
</body></html>
"""
