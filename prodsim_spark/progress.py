"""Progress reporting: every stage logs start, end, row counts and time, and names itself in the Spark UI."""
from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("prodsim_spark")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # py4j logs every gateway call at INFO; keep it quiet unless asked for.
    logging.getLogger("py4j").setLevel(logging.WARNING)


@contextlib.contextmanager
def stage(spark, name: str, what: str):
    """Log the start and end of a stage and label its Spark jobs (shown in the Spark UI)."""
    sc = spark.sparkContext
    sc.setJobGroup(f"prodsim-{name}", f"prodsim {name}: {what}", interruptOnCancel=False)
    sc.setJobDescription(f"prodsim {name}: {what}")
    log.info("[%s] start: %s", name, what)
    started = time.perf_counter()
    try:
        yield
    except Exception:
        log.error("[%s] failed after %.1fs", name, time.perf_counter() - started)
        raise
    finally:
        sc.setJobDescription(None)
    log.info("[%s] done in %.1fs", name, time.perf_counter() - started)
