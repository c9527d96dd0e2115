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
(seconds, no model) rather than stored incrementally like the encoder embeddings.
"""
from __future__ import annotations

from pyspark.ml import Pipeline
from pyspark.ml.feature import IDF, HashingTF, Normalizer, NGram, RegexTokenizer
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from prodsim_spark.config import LexicalSettings


def lexical_text(catalog: DataFrame, settings: LexicalSettings) -> DataFrame:
    """(product_id, lexical_text): the configured fields, lower-cased, punctuation to spaces."""
    parts = [F.coalesce(F.col(f).cast("string"), F.lit("")) for f in settings.fields]
    text = F.lower(F.concat_ws(" ", *parts))
    # identifiers are written with and without separators ("PS-LX350H", "PSLX350H"): join the pieces
    # of a letter/digit run split by - . / so both spellings give the same token and n-grams
    text = F.regexp_replace(text, r"(?<=[\p{L}\p{N}])[-./](?=[\p{L}\p{N}])", "")
    # keep letters and digits of any script; everything else separates tokens
    text = F.regexp_replace(text, r"[^\p{L}\p{N}]+", " ")
    # Chinese and Japanese write words without spaces: each Han or kana character is a token of its
    # own, so words are characters and the character 3-grams across a space are character bigrams
    # ("羊毛衫" -> "羊 毛 衫": " 羊 ", "羊 毛", "毛 衫"), the usual terms for CJK retrieval
    text = F.regexp_replace(text, r"([\p{IsHan}\p{IsHiragana}\p{IsKatakana}])", " $1 ")
    text = F.trim(F.regexp_replace(text, r"\s+", " "))
    return catalog.select("product_id", text.alias("lexical_text"))


def lexical_vectors(catalog: DataFrame, settings: LexicalSettings) -> DataFrame:
    """(product_id, lexical_embedding: array<float>, unit length) for products with lexical text;
    products with none get null (the channel is then missing for them, and renormalised away)."""
    text = lexical_text(catalog, settings).withColumn("padded", F.concat(F.lit(" "), "lexical_text", F.lit(" ")))
    if text.limit(1).count() == 0:  # Spark ML's IDF cannot be fitted on no documents
        return text.select("product_id", F.lit(None).cast("array<float>").alias("lexical_embedding"))
    words = RegexTokenizer(inputCol="lexical_text", outputCol="words", pattern=r"\s+", minTokenLength=1)
    # characters of the padded text, so n-grams also mark word starts and ends (" ps", "0h ")
    chars = RegexTokenizer(inputCol="padded", outputCol="chars", pattern="", gaps=True, toLowercase=False,
                           minTokenLength=1)
    ngrams = [NGram(n=n, inputCol="chars", outputCol=f"grams{n}") for n in settings.ngram_sizes]
    stages = [words, chars, *ngrams]
    features = [f"grams{n}" for n in settings.ngram_sizes] + (["words"] if settings.word_tokens else [])
    staged = Pipeline(stages=stages).fit(text).transform(text)
    staged = staged.withColumn("terms", F.concat(*[F.col(c) for c in features]))
    tfidf = Pipeline(stages=[
        HashingTF(inputCol="terms", outputCol="tf", numFeatures=settings.dims),
        IDF(inputCol="tf", outputCol="tfidf", minDocFreq=settings.min_doc_freq),
        Normalizer(inputCol="tfidf", outputCol="unit", p=2.0),
    ]).fit(staged).transform(staged)
    return tfidf.select(
        "product_id",
        F.when(F.length("lexical_text") > 0, vector_to_array("unit", dtype="float32")).alias("lexical_embedding"))
