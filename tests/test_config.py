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


def test_cross_key_checks_name_the_keys():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["join.block_size=5000"])  # max_block_size stays 4000
    assert "join.block_size" in str(err.value) and "join.max_block_size" in str(err.value)
    zeros = [f"join.weights.{c}=0" for c in ("text", "image", "brand", "category", "price", "lexical")]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=zeros)
    assert "join.weights" in str(err.value) and "every weight is 0" in str(err.value)


def test_a_boolean_is_not_a_number():
    # YAML reads `true` as a boolean, and pydantic would take it as 1: k=1 is not what the user meant
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["join.k=true"])
    assert "join.k" in str(err.value) and "boolean" in str(err.value)
    with pytest.raises(ConfigError):
        load_config(overrides=["join.weights.text=false"])
    assert load_config(overrides=["embed.text.enabled=false"]).embed.text.enabled is False


def test_join_settings_replaced_is_validated():
    from prodsim_spark.config import FusionWeights

    join = load_config().join
    lexical_only = join.replaced(weights=FusionWeights.only(lexical=1.0), k=20)
    assert lexical_only.k == 20 and lexical_only.weights.lexical == 1.0 and lexical_only.weights.text == 0.0
    assert join.k == 10 and join.weights.text == 1.0  # the original is untouched
    assert join.replaced(weights={"image": 0.0}).weights.text == 1.0  # a dict changes only what it names
    with pytest.raises(Exception):
        join.replaced(weights={"imgae": 0.0})  # a misspelt component is an error, not a weight of 0
    with pytest.raises(Exception):
        FusionWeights.only(txt=1.0)


def test_write_config_round_trips(tmp_path):
    from prodsim_spark.config import write_config

    path = tmp_path / "learned.yaml"
    write_config(path, {"join": {"weights": {"text": 0.5, "lexical": 1.0}, "same_source_penalty": 0.7}},
                 "fitted on pairs.csv\nuse with --conf")
    assert path.read_text().startswith("# fitted on pairs.csv\n# use with --conf\n")
    config = load_config([path])
    assert config.join.weights.text == 0.5 and config.join.same_source_penalty == 0.7
    with pytest.raises(ConfigError):
        write_config(tmp_path / "bad.yaml", {"join": {"weights": {"txt": 1.0}}})
    assert not (tmp_path / "bad.yaml").exists()


def test_text_template_names_only_catalog_fields():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["embed.text.template='{title}. {colour}'"])
    msg = str(err.value)
    assert "embed.text.template" in msg and "{colour}" in msg and "description" in msg
    with pytest.raises(ConfigError, match="no {field}"):
        load_config(overrides=["embed.text.template='plain words'"])
    assert load_config(overrides=["embed.text.template='{title|description}. {brand}'"]).embed.text.template
