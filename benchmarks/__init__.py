"""Benchmarks of prodsim-spark (``prodsim bench embed|join|quality``), and the baselines and benchmark
datasets they use. They live beside the library, not in its wheel: they read datasets from a
checkout (``../shared/data``) and need extra packages (``pip install .[bench]``: scikit-learn).

Each compares ours with a baseline in one run, on the same inputs, and reports medians over repeats,
since machines are shared and noisy.

* :mod:`benchmarks.embed`: the Spark embedding stage vs the bare encoder.
* :mod:`benchmarks.join`: our blocked join vs exact top-K vs Spark MLlib LSH, and the scaling fit.
* :mod:`benchmarks.quality`: match quality on a labelled dataset, every method in one run.
* :mod:`benchmarks.baselines`: the character n-gram TF-IDF baseline.
* :mod:`benchmarks.datasets`: the Amazon-Google and grocery catalogs built from ``../shared/data``.
"""
import sys

from pyspark import cloudpickle

# Spark's Python workers cannot import this package (it is not installed, only checked out): ship
# the functions that run in tasks (synthetic data generators) by value instead of by module name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
