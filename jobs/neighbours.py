"""spark-submit entry point: the neighbours stage only.

    spark-submit [cluster options] jobs/neighbours.py --output DIR [--conf FILE] [--set K=V]...

Takes the same arguments as ``prodsim neighbours``; under spark-submit the session comes from
``getOrCreate()``, so the cluster's settings win.
"""
import sys

from prodsim_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["neighbours", *sys.argv[1:]]))
