"""spark-submit entry point: the evaluate stage only.

    spark-submit [cluster options] jobs/evaluate.py --output DIR [--pairs CSV [--ablation]] [--conf FILE] [--set K=V]...

Takes the same arguments as ``prodsim evaluate``; under spark-submit the session comes from
``getOrCreate()``, so the cluster's settings win.
"""
import sys

from prodsim_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
