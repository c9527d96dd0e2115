"""Run with the Airflow venv's Python by tests/test_airflow.py (Airflow lives in its own venv, see
bin/test-deps.sh). Loads jobs/airflow with Airflow's own DagBag and prints, as one JSON line after
'RESULT ': import errors, the task graph and settings, and with --run, the outcome of one dag.test()."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.1
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "jobs" / "airflow"))  # examples off: AIRFLOW__CORE__LOAD_EXAMPLES
    out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dag_ids)}
    dag = bag.dags.get("prodsim_daily")
    if dag is not None:
        out |= {
            "downstream": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
            "operators": {t.task_id: type(t).__name__ for t in dag.tasks},
            "retries": {t.task_id: t.retries for t in dag.tasks},
            "applications": {t.task_id: Path(t.application).name for t in dag.tasks},
            "packages": {t.task_id: t.packages for t in dag.tasks},
            "conf": {t.task_id: t.conf for t in dag.tasks},
            "schedule": str(getattr(dag, "schedule", None) or dag.timetable.summary),
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "params": sorted(dag.params.keys()),
        }
        if "--run" in sys.argv:
            conf = json.loads(sys.argv[sys.argv.index("--run") + 1])
            run = dag.test(run_conf=conf)
            out["state"] = str(run.state)
            out["task_states"] = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
