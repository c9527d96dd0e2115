"""Stages log start, end and time, and (from the CLI) a progress line naming the running Spark stage."""
import logging
import re
import time

from prodsim_spark import progress


def test_stage_logs_progress_of_running_spark_tasks(spark, caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.5)
    progress.set_progress("log")
    try:
        def slow(batches):
            for pdf in batches:
                time.sleep(0.4)
                yield pdf
        with caplog.at_level(logging.INFO, logger="prodsim_spark"):
            with progress.stage(spark, "demo", "slow tasks"):
                spark.range(0, 24, numPartitions=12).mapInPandas(slow, "id long").write.format("noop") \
                    .mode("overwrite").save()
            desc = spark.sparkContext.getLocalProperty("spark.job.description")
    finally:
        progress.set_progress("off")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "[demo] start: slow tasks" and re.fullmatch(r"\[demo\] done in [\d.]+s", lines[-1])
    assert any(re.fullmatch(r"\[demo\] \d+s  job \d+ stage \d+: \d+/12 tasks \(\d running\)", m) for m in lines), lines
    assert desc is None  # the job description is reset after the stage


def test_progress_mode_is_checked():
    try:
        progress.set_progress("loud")
    except ValueError as exc:
        assert "auto, tty, log or off" in str(exc)
    else:
        raise AssertionError("an unknown mode was accepted")
