# A stand-in for dbutils.widgets when a notebook runs as a plain Python script (CI, local runs):
# widget values come from environment variables PRODSIM_<NAME> or the widget's default.
# On Databricks, the notebooks use the real dbutils and never import this.
import os


class LocalWidgets:
    def __init__(self):
        self._defaults = {}

    def text(self, name, default, label=None):
        self._defaults[name] = default

    def dropdown(self, name, default, choices, label=None):
        self._defaults[name] = default

    def get(self, name):
        return os.environ.get(f"PRODSIM_{name.upper()}", self._defaults[name])


def widgets():
    """dbutils.widgets on Databricks, the local stand-in elsewhere."""
    try:
        return dbutils.widgets  # noqa: F821 (defined by the Databricks runtime)
    except NameError:
        return LocalWidgets()
