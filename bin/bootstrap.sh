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
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"

# install_pinned VENV REQUIREMENTS: make VENV hold exactly the pinned REQUIREMENTS, from the wheel
# cache; what the cache lacks is downloaded into it first (--find-links: cached wheels are reused).
install_pinned() {
  local venv="$1" requirements="$2"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
  mkdir -p "$WHEELHOUSE"
  if ! "$venv/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" -r "$requirements" 2>/dev/null; then
    echo "prodsim: filling the wheel cache $WHEELHOUSE from PyPI (several GB the first time, once per machine)" >&2
    "$venv/bin/python" -m pip wheel -q --find-links "$WHEELHOUSE" -r "$requirements" -w "$WHEELHOUSE"
    "$venv/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" -r "$requirements"
  fi
}

# is_current VENV WANT: VENV exists and was last set up for the inputs whose hash is WANT
is_current() {
  [ -x "$1/bin/python" ] && [ "$(cat "$1/.prodsim-stamp" 2>/dev/null)" = "$2" ]
}

if ! is_current "$VENV" "$WANT"; then
  echo "prodsim: setting up $VENV (first run, or requirements changed)" >&2
  install_pinned "$VENV" "$ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$WANT" > "$VENV/.prodsim-stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYSPARK_PYTHON="$VENV/bin/python"
