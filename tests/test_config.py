"""QuantConfig validation and TOML recipes."""

from pathlib import Path

import pytest

from qlin_cli.config import PER_CHANNEL, PER_TENSOR, Granularity, QuantConfig, Rule, Skip, load_recipe
from qlin_cli.errors import ConfigError
from qlin_cli.scheme import PER_TOKEN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults():
    c = QuantConfig()
    assert (c.mode, c.granularity, c.symmetric, c.act_granularity, c.kernel, c.skip) == (
        "dynamic", PER_CHANNEL, True, PER_TOKEN, "auto", ())


def test_act_granularity_defaults_to_token():
    assert QuantConfig(kernel="fbgemm").act_granularity == PER_TOKEN
    assert QuantConfig(kernel="int_mm").act_granularity == PER_TOKEN
    assert QuantConfig(kernel="fbgemm", act_granularity="tensor").act_granularity == PER_TENSOR
    assert QuantConfig(mode="static").act_granularity == PER_TENSOR
    assert QuantConfig(mode="weight-only").act_granularity is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "static8"}, "mode = 'static8' is not valid"),
        ({"granularity": "block"}, "unknown granularity 'block'"),
        ({"granularity": "group"}, "granularity 'group' needs `group_size`"),
        ({"kernel": "cublas"}, "kernel = 'cublas' is not valid"),
        ({"kernel": "weight_only"}, "kernel 'weight_only' needs `mode` weight-only"),
        ({"mode": "weight-only", "kernel": "int_mm"}, "weight-only mode takes"),
        ({"skip": ["("]}, "not a valid regex"),
        ({"symmetric": "yes"}, "symmetric must be true or false"),
    ],
)
def test_invalid_configs_say_how_to_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        QuantConfig(**kwargs)


def test_dict_round_trip_and_json_is_canonical():
    c = QuantConfig(granularity="tensor", symmetric=False, skip=("head", r"^blocks\.0"))
    assert isinstance(c.granularity, Granularity) and c.granularity == PER_TENSOR  # parsed, not the string
    assert c.to_dict()["granularity"] == "tensor" and c.to_dict()["act_granularity"] == "token"
    assert QuantConfig.from_dict(c.to_dict()) == c
    assert c.to_json() == QuantConfig.from_dict(c.to_dict()).to_json()
    with pytest.raises(ConfigError, match="unknown key 'nbits'"):
        QuantConfig.from_dict({"nbits": 4})


def test_skips_first_matching_pattern():
    c = QuantConfig(skip=("head$", "fc"))
    assert c.skips("blocks.0.fc1") == "fc" and c.skips("head") == "head$" and c.skips("embed") is None


def test_granularity_scale_shapes():
    assert Granularity.parse("tensor").scale_shape((1024, 512)) == ()
    assert Granularity.parse("channel").scale_shape((1024, 512)) == (1024,)


@pytest.mark.parametrize("name", ["default", "weight-only", "per-tensor", "w8a8-static", "smoothquant"])
def test_shipped_recipes_load(name):
    """Every key a shipped recipe sets comes back unchanged from the config it makes."""
    data = load_recipe(CONFIGS / f"{name}.toml")
    config = QuantConfig.from_dict(data).to_dict()
    assert data and {key: config[key] for key in data} == data


def test_recipe_errors_name_file_key_and_line(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('mode = "dynamic"\n\nbitz = 4\n')
    with pytest.raises(ConfigError, match=rf"{p}:3: unknown key 'bitz'"):
        load_recipe(p)
    p.write_text('# comment\ngranularity = "block"\n')
    with pytest.raises(ConfigError, match=rf"{p}:2: unknown granularity 'block'"):
        load_recipe(p)
    p.write_text("mode = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_layer_rules_first_match_wins():
    c = QuantConfig(mode="static", layers=[
        {"match": "head$", "skip": True},
        {"match": "fc2", "mode": "dynamic"},
        {"match": "fc", "kernel": "fbgemm", "observer": "mse"},
    ])
    assert c.for_layer("blocks.0.fc2").mode == "dynamic"  # rule 2, not rule 3
    assert c.for_layer("blocks.0.fc2").act_granularity == PER_TOKEN  # re-derived for dynamic
    fc1 = c.for_layer("blocks.0.fc1")
    assert (fc1.mode, fc1.kernel, fc1.observer) == ("static", "fbgemm", "mse")
    assert c.for_layer("embed") is c.scheme and c.rule_for("head") == Rule("head$", skip=True)
    assert c.rule_for("head").to_dict() == {"match": "head$", "skip": True}
    assert c.for_layer("head") == Skip("recipe rule match='head$' skips it")
    assert QuantConfig(layers=[{"match": "x", "mode": "static"}]).calibration_need() == "static mode"
    assert QuantConfig(layers=[{"match": "x", "mode": "weight-only"}]).calibration_need() is None
    assert QuantConfig.from_dict(c.to_dict()) == c


def test_recipe_rule_errors_point_at_the_rule(tmp_path):
    p = tmp_path / "r.toml"
    base = 'mode = "static"\n\n[[layers]]\nmatch = "head"\nskip = true\n\n[[layers]]\nmatch = "fc2"\n'
    p.write_text(base + "nbits = 4\n")
    with pytest.raises(ConfigError, match=rf"{p}:9: layers\[1\]: unknown key 'nbits'"):
        load_recipe(p)
    p.write_text(base + 'kernel = "weight_only"\n')
    with pytest.raises(ConfigError, match=rf"{p}:9: layers\[1\] \(match 'fc2'\): kernel 'weight_only' needs"):
        load_recipe(p)
    p.write_text(base.replace('"fc2"', '"("'))
    with pytest.raises(ConfigError, match=rf"{p}:8: layers\[1\]: match '\(' is not a valid regex"):
        load_recipe(p)
