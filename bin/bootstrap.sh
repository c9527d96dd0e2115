# Sourced by bin/prodsim and bin/test: make sure .venv exists and matches requirements.txt + setup.py.
#
# torch and its CUDA libraries are several GB. They are downloaded once per machine into a wheel
# cache (~/.cache/prodsim-spark/wheels, or $PRODSIM_WHEELHOUSE) and every later venv, such as the one
# CI builds in a fresh clone, installs from it with no download. Delta Lake's jars are fetched from
# Maven Central on the first Spark start and cached too (see prodsim_spark/session.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WHEELHOUSE="${PRODSIM_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/prodsim-spark/wheels}"
PYTHON="${PRODSIM_PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
STAMP="$VENV/.prodsim-stamp"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "prodsim: setting up $VENV (first run, or requirements changed)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  mkdir -p "$WHEELHOUSE"
  if ! "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" -r "$ROOT/requirements.txt" 2>/dev/null; then
    echo "prodsim: filling the wheel cache $WHEELHOUSE from PyPI (several GB, once per machine)" >&2
    # --find-links: wheels already in the cache are reused, only the missing ones are downloaded
    "$VENV/bin/python" -m pip wheel -q --find-links "$WHEELHOUSE" -r "$ROOT/requirements.txt" -w "$WHEELHOUSE"
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" -r "$ROOT/requirements.txt"
  fi
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYSPARK_PYTHON="$VENV/bin/python"
