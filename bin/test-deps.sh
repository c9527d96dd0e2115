# Sourced by bin/test after bootstrap.sh: what only the tests need, beside .venv.
#
# * .venv-airflow: Apache Airflow and its Spark provider (requirements-airflow.txt), for the DAG test.
#   Airflow gets a venv of its own, as on a real deployment where the scheduler's workers run
#   spark-submit and the job's packages live on the cluster: Airflow pins a few hundred packages that
#   must not move the job's pins. Wheels come from the same machine cache as .venv's.
# * Debian's chromium, for the report's browser test (installed with apt-get once per machine).
AIRFLOW_VENV="$ROOT/.venv-airflow"
AIRFLOW_WANT="$(sha256sum "$ROOT/requirements-airflow.txt" | cut -d' ' -f1)"
if ! is_current "$AIRFLOW_VENV" "$AIRFLOW_WANT"; then
  echo "prodsim: setting up $AIRFLOW_VENV for the Airflow DAG test" >&2
  install_pinned "$AIRFLOW_VENV" "$ROOT/requirements-airflow.txt"
  echo "$AIRFLOW_WANT" > "$AIRFLOW_VENV/.prodsim-stamp"
fi
export PRODSIM_AIRFLOW_PYTHON="$AIRFLOW_VENV/bin/python"

if ! command -v chromium >/dev/null 2>&1; then
  echo "prodsim: installing Debian's chromium for the report's browser test" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null \
    || echo "prodsim: could not install chromium (the report's browser test will fail and say so)" >&2
fi
