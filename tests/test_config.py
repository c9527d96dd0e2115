from pathlib import Path

import pytest
import yaml

from prodsim_spark.config import ProdsimConfig, default_config_dict, load_config, parse_override
from prodsim_spark.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_conf_default_yaml_matches_schema_defaults():
    documented = yaml.safe_load((ROOT / "conf" / "default.yaml").read_text())
    assert documented == default_config_dict()


def test_layering_file_then_overrides(tmp_path):
    conf = tmp_path / "mine.yaml"
    conf.write_text("ingest:\n  columns:\n    title: name\n  max_title_chars: 50\n")
    config = load_config([conf], ["ingest.max_title_chars=80", "spark.extra_conf={a.b: c}"])
    assert config.ingest.columns.title == "name"
    assert config.ingest.columns.product_id == "product_id"  # untouched defaults stay
    assert config.ingest.max_title_chars == 80  # --set wins over the file
    assert config.spark.extra_conf == {"a.b": "c"}


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["ingest.colums.title=name"])
    msg = str(err.value)
    assert "unknown config key 'ingest.colums'" in msg
    assert "columns" in msg and "max_title_chars" in msg


def test_bad_enum_value_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["ingest.format=xml"])
    msg = str(err.value)
    assert "ingest.format" in msg and "'xml'" in msg
    for allowed in ("csv", "parquet", "json", "delta"):
        assert allowed in msg


def test_bad_number_names_key():
    with pytest.raises(ConfigError, match=r"ingest\.max_title_chars"):
        load_config(overrides=["ingest.max_title_chars=0"])
    with pytest.raises(ConfigError, match=r"ingest\.max_title_chars"):
        load_config(overrides=["ingest.max_title_chars=lots"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("ingest.format")
    with pytest.raises(ConfigError, match="bad key"):
        parse_override("ingest..format=csv")


def test_override_values_are_yaml_not_code():
    assert parse_override("a.b=__import__('os')")[1] == "__import__('os')"
    assert parse_override("a.b=12")[1] == 12
    assert parse_override("a.b=null")[1] is None


def test_config_file_must_be_a_mapping(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([conf])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config([tmp_path / "missing.yaml"])


def test_defaults_validate():
    assert ProdsimConfig().ingest.required_columns == ["product_id"]
