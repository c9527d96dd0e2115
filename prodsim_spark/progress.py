"""Progress reporting: every stage logs start, end, row counts and time, names itself in the Spark UI,
and (from the CLI) shows a progress line with the running Spark stage's finished tasks."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

log = logging.getLogger("prodsim_spark")

# "off" (library default: notebooks and jobs have the Spark UI), "tty" (a line redrawn in place on
# stderr), "log" (a log line every LOG_EVERY seconds, for schedulers' task logs); the CLI picks.
_mode = "off"
TTY_EVERY, LOG_EVERY = 1.0, 30.0


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # py4j logs every gateway call at INFO; keep it quiet unless asked for.
    logging.getLogger("py4j").setLevel(logging.WARNING)


def set_progress(mode: str) -> None:
    """``auto``: a redrawn line on a terminal, else periodic log lines; or ``tty``, ``log``, ``off``."""
    global _mode
    if mode == "auto":
        mode = "tty" if sys.stderr.isatty() else "log"
    if mode not in ("tty", "log", "off"):
        raise ValueError(f"progress mode {mode!r}: use auto, tty, log or off")
    _mode = mode


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def describe_tasks(sc, group: str) -> str | None:
    """'job 3, stage 7: 12/40 tasks (4 running)' for the group's running Spark stages, or None."""
    tracker = sc.statusTracker()
    running = set(tracker.getActiveJobsIds())
    parts = []
    for job_id in sorted(set(tracker.getJobIdsForGroup(group)) & running):
        job = tracker.getJobInfo(job_id)
        for stage_id in sorted(job.stageIds if job else []):
            info = tracker.getStageInfo(stage_id)
            if info is not None and info.numActiveTasks + info.numCompletedTasks > 0 \
                    and info.numCompletedTasks < info.numTasks:
                parts.append(f"job {job_id} stage {stage_id}: {info.numCompletedTasks}/{info.numTasks} tasks "
                             f"({info.numActiveTasks} running)")
    return "; ".join(parts) or None


class _ProgressLine(threading.Thread):
    def __init__(self, sc, name: str, group: str, mode: str):
        super().__init__(daemon=True, name=f"prodsim-progress-{name}")
        self.sc, self.name_, self.group, self.mode = sc, name, group, mode
        self.started = time.perf_counter()
        self.done = threading.Event()
        self.drawn = 0

    def run(self) -> None:
        every = TTY_EVERY if self.mode == "tty" else LOG_EVERY
        while not self.done.wait(every):
            try:
                tasks = describe_tasks(self.sc, self.group)
            except Exception:  # the session is stopping; progress is best effort
                return
            line = f"[{self.name_}] {_elapsed(time.perf_counter() - self.started)}" + (f"  {tasks}" if tasks else "")
            if self.mode == "tty":
                sys.stderr.write("\r" + line.ljust(self.drawn)[:160])
                sys.stderr.flush()
                self.drawn = min(len(line), 160)
            else:
                log.info("%s", line)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        if self.mode == "tty" and self.drawn:
            sys.stderr.write("\r" + " " * self.drawn + "\r")
            sys.stderr.flush()


@contextlib.contextmanager
def stage(spark, name: str, what: str):
    """Log the start and end of a stage, label its Spark jobs (shown in the Spark UI) and, when the
    CLI asked for it, keep a progress line going while it runs."""
    sc = spark.sparkContext
    group = f"prodsim-{name}"
    sc.setJobGroup(group, f"prodsim {name}: {what}", interruptOnCancel=False)
    sc.setJobDescription(f"prodsim {name}: {what}")
    log.info("[%s] start: %s", name, what)
    started = time.perf_counter()
    line = _ProgressLine(sc, name, group, _mode) if _mode != "off" else None
    if line:
        line.start()
    try:
        yield
    except Exception:
        log.error("[%s] failed after %.1fs", name, time.perf_counter() - started)
        raise
    finally:
        if line:
            line.stop()
        sc.setJobDescription(None)
    log.info("[%s] done in %.1fs", name, time.perf_counter() - started)
