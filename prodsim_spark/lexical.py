"""Lexical channel: what a product's words and identifiers look like, for matches a dense encoder blurs.

Model numbers, SKUs and part numbers ("PSLX350H", "EZXS88W") decide many real matches, and a
sentence encoder maps "PSLX350H" and "PSLX450H" to nearly the same point. Character n-grams keep them
apart. The channel is a TF-IDF of character n-grams and word tokens, hashed into ``lexical.dims``
buckets and L2-normalised, built with Spark ML feature transformers (RegexTokenizer, NGram,
HashingTF, IDF, Normalizer).

It is a *vector channel* of the fused score, like text and image: the cosine of two lexical vectors
is one more weighted component, and its (weighted) vector is part of the blocking vector, so the
join finds lexical look-alikes in the same pass that ranks them by the fused score. Hashing keeps the
vector dense and fixed-size, at the cost of a little noise from collisions (see ``lexical.dims``).

IDF weights depend on the whole catalog, so the channel is recomputed from the catalog on each run
(seconds, no model) rather than stored incrementally like the encoder embeddings; the fitted weights
(:func:`fit_idf`) are kept in the search index, so that a query's vector (:func:`query_vectors`, pure
Python: the same cleaning, terms and Spark's murmur3 hashing) is on the products' scale.

Scripts without spaces between words (Chinese, Japanese) get each Han or kana character as a term,
so their character n-grams are character bigrams; every step works on characters, never bytes.
"""
from __future__ import annotations

import numpy as np
from pyspark.ml import Pipeline
from pyspark.ml.feature import IDF, ElementwiseProduct, HashingTF, Normalizer, NGram, RegexTokenizer
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import DenseVector
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from prodsim_spark.config import LexicalSettings


# the cleaning steps of lexical_text, as (Java regex, replacement); query_text applies the same ones
_SEPARATOR_IN_IDENTIFIER = (r"(?<=[\p{L}\p{N}])[-./](?=[\p{L}\p{N}])", "")
_NOT_LETTER_OR_DIGIT = (r"[^\p{L}\p{N}]+", " ")
_CJK = (r"([\p{IsHan}\p{IsHiragana}\p{IsKatakana}])", " $1 ")


def lexical_text(catalog: DataFrame, settings: LexicalSettings) -> DataFrame:
    """(product_id, lexical_text): the configured fields, lower-cased, punctuation to spaces."""
    parts = [F.coalesce(F.col(f).cast("string"), F.lit("")) for f in settings.fields]
    text = F.lower(F.concat_ws(" ", *parts))
    # identifiers are written with and without separators ("PS-LX350H", "PSLX350H"): join the pieces
    # of a letter/digit run split by - . / so both spellings give the same token and n-grams
    text = F.regexp_replace(text, *_SEPARATOR_IN_IDENTIFIER)
    # keep letters and digits of any script; everything else separates tokens
    text = F.regexp_replace(text, *_NOT_LETTER_OR_DIGIT)
    # Chinese and Japanese write words without spaces: each Han or kana character is a token of its
    # own, so words are characters and the character 3-grams across a space are character bigrams
    # ("羊毛衫" -> "羊 毛 衫": " 羊 ", "羊 毛", "毛 衫"), the usual terms for CJK retrieval
    text = F.regexp_replace(text, *_CJK)
    text = F.trim(F.regexp_replace(text, r"\s+", " "))
    return catalog.select("product_id", text.alias("lexical_text"))


def _terms(catalog: DataFrame, settings: LexicalSettings) -> DataFrame:
    """(product_id, lexical_text, terms): the character n-grams of the padded text and the words."""
    text = lexical_text(catalog, settings).withColumn("padded", F.concat(F.lit(" "), "lexical_text", F.lit(" ")))
    words = RegexTokenizer(inputCol="lexical_text", outputCol="words", pattern=r"\s+", minTokenLength=1)
    # characters of the padded text, so n-grams also mark word starts and ends (" ps", "0h ")
    chars = RegexTokenizer(inputCol="padded", outputCol="chars", pattern="", gaps=True, toLowercase=False,
                           minTokenLength=1)
    ngrams = [NGram(n=n, inputCol="chars", outputCol=f"grams{n}") for n in settings.ngram_sizes]
    features = [f"grams{n}" for n in settings.ngram_sizes] + (["words"] if settings.word_tokens else [])
    staged = Pipeline(stages=[words, chars, *ngrams]).fit(text).transform(text)
    tf = HashingTF(inputCol="terms", outputCol="tf", numFeatures=settings.dims)
    return tf.transform(staged.withColumn("terms", F.concat(*[F.col(c) for c in features])))


def fit_idf(catalog: DataFrame, settings: LexicalSettings) -> np.ndarray | None:
    """The channel's IDF weights over ``catalog`` (Spark ML's ``log((n + 1) / (df + 1))``, 0 under
    ``min_doc_freq``), or None when no product has lexical text (IDF cannot be fitted on nothing)."""
    terms = _terms(catalog, settings).where(F.length("lexical_text") > 0)
    if terms.limit(1).count() == 0:
        return None
    model = IDF(inputCol="tf", outputCol="tfidf", minDocFreq=settings.min_doc_freq).fit(terms)
    return model.idf.toArray().astype(np.float64)


def lexical_vectors(catalog: DataFrame, settings: LexicalSettings, idf: np.ndarray | None = None) -> DataFrame:
    """(product_id, lexical_embedding: array<float>, unit length) for products with lexical text;
    products with none get null (the channel is then missing for them, and renormalised away).
    ``idf``: weights from :func:`fit_idf` (default: fitted on ``catalog`` itself)."""
    if idf is None:
        idf = fit_idf(catalog, settings)
    terms = _terms(catalog, settings)
    if idf is None:
        return terms.select("product_id", F.lit(None).cast("array<float>").alias("lexical_embedding"))
    weighted = ElementwiseProduct(scalingVec=DenseVector(idf), inputCol="tf", outputCol="tfidf").transform(terms)
    unit = Normalizer(inputCol="tfidf", outputCol="unit", p=2.0).transform(weighted)
    return unit.select(
        "product_id",
        F.when(F.length("lexical_text") > 0, vector_to_array("unit", dtype="float32")).alias("lexical_embedding"))


# --------------------------------------------------------------------------------------------
# the same channel in plain Python, for one query at a time (search's notebook API)


def _java_regex(pattern: str) -> str:
    return pattern.replace("\\p{IsHan}", "\\p{Han}").replace("\\p{IsHiragana}", "\\p{Hiragana}") \
        .replace("\\p{IsKatakana}", "\\p{Katakana}")


def query_text(text: str | None) -> str:
    """What :func:`lexical_text` makes of one text, in Python (the ``regex`` module speaks Unicode
    classes as Java does)."""
    import regex

    out = (text or "").lower()
    for pattern, replacement in (_SEPARATOR_IN_IDENTIFIER, _NOT_LETTER_OR_DIGIT, _CJK):
        out = regex.sub(_java_regex(pattern), replacement.replace("$1", r"\1"), out)
    return regex.sub(r"\s+", " ", out).strip()


def query_terms(text: str, settings: LexicalSettings) -> list[str]:
    """The terms :func:`_terms` gives for an already cleaned text: character n-grams (joined by spaces,
    as Spark's NGram joins them), then words."""
    chars = list(f" {text} ")
    terms = [" ".join(chars[i:i + n]) for n in settings.ngram_sizes for i in range(len(chars) - n + 1)]
    return terms + (text.split() if settings.word_tokens else [])


def query_vectors(texts: list[str | None], settings: LexicalSettings, idf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((n, dims) float32 unit rows, has mask) for raw texts: the vector each would get as a product's
    lexical text under ``idf`` (HashingTF's murmur3 with seed 42, IDF, L2 norm)."""
    import mmh3

    out = np.zeros((len(texts), settings.dims), dtype=np.float32)
    for row, raw in enumerate(texts):
        clean = query_text(raw)
        if not clean:
            continue
        for term in query_terms(clean, settings):
            out[row, mmh3.hash(term.encode("utf-8"), 42) % settings.dims] += 1.0
        out[row] *= idf
    norms = np.linalg.norm(out, axis=1)
    has = norms > 0
    out[has] /= norms[has, None]
    return out, has
