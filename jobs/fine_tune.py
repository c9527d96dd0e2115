"""spark-submit entry point: fine-tune the text or image encoder on labelled matches of a run.

    spark-submit [cluster options] jobs/fine_tune.py --modality text|image --run DIR \
        (--pairs CSV | --groups CSV) --model-out MODEL_DIR [--base MODEL] [--json] [--conf FILE] [--set K=V]...

Takes the same arguments as ``prodsim fine-tune``. Training runs through Spark's TorchDistributor:
set ``finetune.local_mode=false`` and ``finetune.num_processes`` to the number of GPUs to train on the
executors (one process per GPU); the model folder must be on storage the driver can write.
"""
import sys

from prodsim_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["fine-tune", *sys.argv[1:]]))
