"""spark-submit entry point: the group stage only.

    spark-submit [cluster options] jobs/group.py --output DIR [--threshold T] [--conf FILE] [--set K=V]...

Takes the same arguments as ``prodsim group``; under spark-submit the session comes from
``getOrCreate()``, so the cluster's settings win.
"""
import sys

from prodsim_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["group", *sys.argv[1:]]))
