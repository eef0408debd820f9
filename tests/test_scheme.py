"""The granularity family and LayerScheme: scale shapes, parsing, validation messages, the plan
entry's form (to_dict / from_dict), the recipe's form (to_recipe / with_changes)."""

import dataclasses
import itertools
import math
import re

import pytest

from qlin_cli.errors import ConfigError
from qlin_cli.kernels.registry import request_names
from qlin_cli.scheme import ROUNDING_KEYS  # noqa: E402
from qlin_cli.scheme import (
    ACT_GRANULARITIES, MODES, PER_CHANNEL, PER_TENSOR, PER_TOKEN, WEIGHT_GRANULARITIES, Granularity,
    LayerScheme, PerChannel, PerTensor, PerToken,
)

ENTRY_KEYS = ("mode", "granularity", "bits", "group_size", "symmetric", "act_granularity", "kernel_request",
              "weight_observer", "observer", "smooth")


def expected(message: str) -> str:
    """`message` as a regex; `<mode>` is the mode option, however the message spells it."""
    return re.escape(message).replace(re.escape("<mode>"), r"(?:--mode|`mode`)")


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg, msg
    return msg


# -- granularities -----------------------------------------------------------------------------


def test_scale_shapes_of_weights_and_activations():
    w = (1024, 512)
    assert PER_TENSOR.scale_shape(w) == ()
    assert PER_CHANNEL.scale_shape(w) == (1024,)
    assert PER_TOKEN.scale_shape((37, 512)) == (37,)  # activations flattened to (tokens, in)
    assert PER_TENSOR.scale_shape((37, 512)) == ()
    # the shapes are plain tuples of ints (they go into JSON reports and torch.ones)
    assert all(type(n) is int for n in PER_CHANNEL.scale_shape(w))


def test_granularity_names_and_singletons():
    assert (str(PER_TENSOR), str(PER_CHANNEL), str(PER_TOKEN)) == ("tensor", "channel", "token")
    assert PerTensor() == PER_TENSOR and PerChannel() == PER_CHANNEL and PerToken() == PER_TOKEN
    assert PER_TENSOR != PER_CHANNEL and PER_CHANNEL != PER_TOKEN and PER_TENSOR != PER_TOKEN
    assert len({PER_TENSOR, PER_CHANNEL, PER_TOKEN, PerTensor()}) == 3
    assert WEIGHT_GRANULARITIES == (PER_TENSOR, PER_CHANNEL)
    assert ACT_GRANULARITIES == (PER_TOKEN, PER_TENSOR)
    with pytest.raises(NotImplementedError):
        Granularity().scale_shape((4, 4))


@pytest.mark.parametrize("value, want", [
    ("tensor", PER_TENSOR), ("channel", PER_CHANNEL), (PER_TENSOR, PER_TENSOR), (PerChannel(), PER_CHANNEL),
])
def test_parse_weight_granularity(value, want):
    got = Granularity.parse(value)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value, want", [("token", PER_TOKEN), ("tensor", PER_TENSOR), (PER_TOKEN, PER_TOKEN)])
def test_parse_activation_granularity(value, want):
    assert Granularity.parse(value, ACT_GRANULARITIES) == want


@pytest.mark.parametrize("value", ["group", "Channel", "", "per_channel"])
def test_parse_unknown_name_lists_allowed(value):
    with pytest.raises(ConfigError) as exc:
        Granularity.parse(value)
    assert one_line(exc) == f"unknown granularity {value!r}: use one of tensor, channel"


def test_parse_weights_refuse_token():
    with pytest.raises(ConfigError) as exc:
        Granularity.parse(PER_TOKEN)
    assert one_line(exc) == "unknown granularity 'token': use one of tensor, channel"
    with pytest.raises(ConfigError, match="use one of tensor, channel"):
        Granularity.parse("token")


@pytest.mark.parametrize("value", ["channel", PER_CHANNEL])
def test_parse_activations_refuse_channel(value):
    with pytest.raises(ConfigError) as exc:
        Granularity.parse(value, ACT_GRANULARITIES)
    assert one_line(exc) == "unknown granularity 'channel': use one of token, tensor"


@pytest.mark.parametrize("value", [3, None, True, ["channel"]])
def test_parse_non_names(value):
    with pytest.raises(ConfigError) as exc:
        Granularity.parse(value)
    assert one_line(exc) == f"granularity must be 'tensor' or 'channel', not {value!r}"


# -- LayerScheme validation --------------------------------------------------------------------


def test_defaults():
    s = LayerScheme()
    assert (s.mode, s.granularity, s.symmetric, s.act_granularity, s.kernel) == (
        "dynamic", PER_CHANNEL, True, PER_TOKEN, "auto")
    assert (s.observer, s.weight_observer, s.percentile, s.smooth) == ("minmax", "minmax", 99.99, None)
    assert s.per_token and not s.static and s.calibration_need is None
    assert LayerScheme(mode="static").act_granularity == PER_TENSOR
    assert LayerScheme(mode="weight-only").act_granularity is None
    assert LayerScheme(granularity="tensor").granularity is PER_TENSOR  # names become the singletons


@pytest.mark.parametrize("keys, message", [
    ({"mode": "int4"}, "mode = 'int4' is not valid: use one of dynamic, weight-only, static"),
    ({"mode": "Dynamic"}, "mode = 'Dynamic' is not valid: use one of dynamic, weight-only, static"),
    ({"kernel": "cublas"}, "kernel = 'cublas' is not valid: use one of auto, onednn, pertoken, lowbit_dynamic, fbgemm, int_mm, weight_only, lowbit, int4pack"),
    ({"observer": "max"}, "observer = 'max' is not valid: use one of minmax, absmax, moving-average, percentile, mse"),
    ({"weight_observer": "kl"},
     "weight_observer = 'kl' is not valid: use one of minmax, absmax, moving-average, percentile, mse"),
    ({"granularity": "token"}, "unknown granularity 'token': use one of tensor, channel"),
    ({"act_granularity": "channel"}, "act_granularity = 'channel' is not valid: use one of token, tensor"),
    ({"act_granularity": PER_CHANNEL}, "act_granularity = 'channel' is not valid: use one of token, tensor"),
    ({"mode": "static", "act_granularity": "token"},
     "static mode calibrates one activation scale per tensor; drop act_granularity"),
    ({"mode": "weight-only", "act_granularity": "token"},
     "act_granularity applies to dynamic mode only; drop it for weight-only"),
    ({"mode": "weight-only", "act_granularity": "tensor"},
     "act_granularity applies to dynamic mode only; drop it for weight-only"),
    ({"mode": "weight-only", "kernel": "int_mm"},
     "kernel 'int_mm' quantizes activations; weight-only mode takes kernel 'auto', 'weight_only', 'lowbit', 'int4pack'"),
    ({"mode": "weight-only", "kernel": "fbgemm"},
     "kernel 'fbgemm' quantizes activations; weight-only mode takes kernel 'auto', 'weight_only', 'lowbit', 'int4pack'"),
    ({"kernel": "weight_only"}, "kernel 'weight_only' needs <mode> weight-only"),
    ({"mode": "static", "kernel": "weight_only"}, "kernel 'weight_only' needs <mode> weight-only"),
    ({"smooth": 0}, "smooth = 0 is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5"),
    ({"smooth": 1.5}, "smooth = 1.5 is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5"),
    ({"smooth": -0.5}, "smooth = -0.5 is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5"),
    ({"smooth": "0.5"}, "smooth = '0.5' is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5"),
    ({"smooth": True}, "smooth = True is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5"),
    ({"mode": "weight-only", "smooth": 0.5},
     "smooth moves activation outliers into weights; it needs <mode> dynamic or static"),
    ({"percentile": 50}, "percentile = 50 is not valid: use a number in (50, 100]"),
    ({"percentile": 100.5}, "percentile = 100.5 is not valid: use a number in (50, 100]"),
    ({"percentile": "99"}, "percentile = '99' is not valid: use a number in (50, 100]"),
    ({"percentile": True}, "percentile = True is not valid: use a number in (50, 100]"),
    ({"percentile": None}, "percentile = None is not valid: use a number in (50, 100]"),
    ({"symmetric": 1}, "symmetric must be true or false, not 1"),
    ({"symmetric": "true"}, "symmetric must be true or false, not 'true'"),
    ({"symmetric": None}, "symmetric must be true or false, not None"),
])
def test_invalid_schemes_say_why_in_one_line(keys, message):
    with pytest.raises(ConfigError) as exc:
        LayerScheme(**keys)
    assert re.fullmatch(expected(message), one_line(exc)), (one_line(exc), message)


@pytest.mark.parametrize("key, value", [
    ("percentile", math.nan), ("percentile", math.inf), ("percentile", -math.inf),
    ("smooth", math.nan), ("smooth", math.inf),
])
def test_non_finite_numbers_do_not_get_through(key, value):
    with pytest.raises(ConfigError, match=f"^{key} = {value!r} is not valid"):
        LayerScheme(**{key: value})


def test_boundary_numbers_are_valid_and_stored_as_float():
    s = LayerScheme(percentile=100, smooth=1)
    assert s.percentile == 100.0 and type(s.percentile) is float
    assert s.smooth == 1.0 and type(s.smooth) is float
    assert LayerScheme(percentile=50.001).percentile == 50.001
    assert LayerScheme(mode="static", smooth=0.01).smooth == 0.01


def test_calibration_need_says_what_needs_calibration_data():
    assert LayerScheme(mode="static").calibration_need == "static mode"
    assert LayerScheme(mode="static", smooth=0.5).calibration_need == "static mode"
    assert LayerScheme(smooth=0.5).calibration_need == "SmoothQuant (`smooth`)"
    assert LayerScheme(mode="weight-only").calibration_need is None
    assert LayerScheme(act_granularity="tensor").calibration_need is None


# -- the plan entry's form ---------------------------------------------------------------------


def test_entry_keys_are_the_file_format():
    assert LayerScheme.ENTRY_KEYS == ENTRY_KEYS
    assert tuple(LayerScheme.none_dict()) == ENTRY_KEYS
    assert set(LayerScheme.none_dict().values()) == {None}


def test_to_dict_exact_keys_and_values():
    d = LayerScheme().to_dict()
    assert tuple(d) == ENTRY_KEYS
    assert d == {"mode": "dynamic", "granularity": "channel", "bits": 8, "group_size": None, "symmetric": True, "act_granularity": "token",
                 "kernel_request": "auto", "weight_observer": "minmax", "observer": None, "smooth": None}
    d = LayerScheme(mode="static", granularity=PER_TENSOR, symmetric=False, kernel="int_mm", observer="mse",
                    weight_observer="absmax", smooth=0.5).to_dict()
    assert tuple(d) == ENTRY_KEYS
    assert d == {"mode": "static", "granularity": "tensor", "bits": 8, "group_size": None, "symmetric": False, "act_granularity": "tensor",
                 "kernel_request": "int_mm", "weight_observer": "absmax", "observer": "mse", "smooth": 0.5}
    d = LayerScheme(mode="weight-only", kernel="weight_only").to_dict()
    assert d["act_granularity"] is None and d["observer"] is None and d["kernel_request"] == "weight_only"
    d = LayerScheme(bits=4, group_size=32, symmetric=False).to_dict()
    assert (d["mode"], d["granularity"], d["bits"], d["group_size"]) == ("weight-only", "group", 4, 32)


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_to_dict_records_the_observer_for_static_only(mode):
    assert LayerScheme(mode=mode, observer="percentile").to_dict()["observer"] is None
    assert LayerScheme(mode="static", observer="percentile").to_dict()["observer"] == "percentile"


def test_to_dict_values_are_plain_json_types():
    import json

    for s in (LayerScheme(), LayerScheme(mode="static", smooth=0.5), LayerScheme(mode="weight-only")):
        d = s.to_dict()
        assert all(v is None or type(v) in (str, bool, int, float) for v in d.values()), d
        assert json.loads(json.dumps(d)) == d


def all_combinations():
    """Every mode x granularity x symmetric x act granularity x kernel that validates."""
    valid, invalid = [], 0
    for mode, gran, sym, act, kernel in itertools.product(
        MODES, WEIGHT_GRANULARITIES, (True, False), (None, PER_TOKEN, PER_TENSOR), request_names()
    ):
        try:
            valid.append(LayerScheme(mode=mode, granularity=gran, symmetric=sym, act_granularity=act, kernel=kernel))
        except ConfigError:
            invalid += 1
    return valid, invalid


def test_combination_count():
    valid, invalid = all_combinations()
    # per granularity x symmetric (4): dynamic 3 acts x 5 kernels (auto, onednn, pertoken, fbgemm,
    # int_mm: not the weight-only ones) = 15, + lowbit_dynamic with acts None and token = 2, static
    # 2 acts (None, tensor) x 5 kernels = 10, weight-only 1 act (None) x 3 kernels (auto,
    # weight_only, lowbit; int4pack needs 4-bit groups) = 3
    assert len(valid) == 4 * (17 + 10 + 3) == 120
    assert invalid == 3 * 2 * 2 * 3 * 9 - 120
    # an unset act granularity resolves to the mode's default: dynamic None == token, static None == tensor
    assert len(set(valid)) == 4 * (11 + 5 + 3) == 76
    assert {s.act_granularity for s in valid if s.mode == "static"} == {PER_TENSOR}
    assert {s.act_granularity for s in valid if s.mode == "weight-only"} == {None}
    assert {s.act_granularity for s in valid if s.mode == "dynamic"} == {PER_TOKEN, PER_TENSOR}


def test_from_dict_round_trips_every_valid_combination():
    valid, _ = all_combinations()
    for s in valid:
        d = s.to_dict()
        assert tuple(d) == ENTRY_KEYS
        assert isinstance(d["granularity"], str)
        assert d["act_granularity"] is None or isinstance(d["act_granularity"], str)
        back = LayerScheme.from_dict(d)
        assert back == s, (d, back)
        assert back.to_dict() == d


@pytest.mark.parametrize("s", [
    LayerScheme(mode="static", observer="mse", smooth=0.8, weight_observer="percentile"),
    LayerScheme(smooth=0.25, act_granularity="tensor", symmetric=False),
])
def test_from_dict_round_trips_observers_and_smooth(s):
    assert LayerScheme.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("mode, stored, message", [
    ("dynamic", None, "act_granularity None does not fit mode 'dynamic'"),
    ("static", None, "act_granularity None does not fit mode 'static'"),
    ("static", "token", "static mode calibrates one activation scale per tensor; drop act_granularity"),
    ("weight-only", "token", "act_granularity applies to dynamic mode only; drop it for weight-only"),
    ("dynamic", "channel", "act_granularity = 'channel' is not valid: use one of token, tensor"),
])
def test_from_dict_refuses_unresolved_or_wrong_act_granularity(mode, stored, message):
    d = LayerScheme(mode=mode).to_dict()
    d["act_granularity"] = stored
    with pytest.raises(ConfigError) as exc:
        LayerScheme.from_dict(d)
    assert one_line(exc) == message


@pytest.mark.parametrize("key, value, message", [
    ("mode", 1, "mode = 1 is not valid"),
    ("mode", None, "mode = None is not valid"),
    ("granularity", PER_CHANNEL, "granularity = PerChannel() is not valid"),  # the file holds names
    ("granularity", ["channel"], "granularity = ['channel'] is not valid"),
    ("kernel_request", None, "kernel_request = None is not valid"),
    ("symmetric", "true", "symmetric must be true or false, not 'true'"),
    ("symmetric", 1, "symmetric must be true or false, not 1"),
    ("smooth", "0.5", "smooth = '0.5' is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5"),
    ("smooth", True, "smooth = True is not valid: SmoothQuant's alpha is in (0, 1], e.g. 0.5"),
    ("weight_observer", 3, "weight_observer = 3 is not valid: use one of minmax, absmax, moving-average, percentile, mse"),
    ("act_granularity", 1, "act_granularity = 1 is not valid: use one of token, tensor"),
])
def test_from_dict_refuses_wrong_types(key, value, message):
    d = LayerScheme().to_dict()
    d[key] = value
    with pytest.raises(ConfigError) as exc:
        LayerScheme.from_dict(d)
    assert one_line(exc) == message


def test_from_dict_refuses_missing_keys():
    for key in ("mode", "granularity", "kernel_request", "symmetric", "act_granularity"):
        d = LayerScheme().to_dict()
        del d[key]
        with pytest.raises(ConfigError):
            LayerScheme.from_dict(d)


# -- the recipe's form --------------------------------------------------------------------------


@pytest.mark.parametrize("start, changes, act", [
    ({}, {"mode": "static"}, PER_TENSOR),
    ({"act_granularity": "tensor"}, {"mode": "static"}, PER_TENSOR),
    ({"mode": "static"}, {"mode": "dynamic"}, PER_TOKEN),
    ({"mode": "static"}, {"mode": "weight-only"}, None),
    ({"mode": "weight-only"}, {"mode": "dynamic"}, PER_TOKEN),
    ({"mode": "weight-only", "kernel": "weight_only"}, {"mode": "dynamic", "kernel": "int_mm"}, PER_TOKEN),
    ({"mode": "static"}, {"mode": "dynamic", "act_granularity": "tensor"}, PER_TENSOR),
    ({"mode": "weight-only"}, {"mode": "dynamic", "act_granularity": PER_TENSOR}, PER_TENSOR),
    ({"act_granularity": "tensor"}, {"symmetric": False}, PER_TENSOR),  # neither mode nor kernel: kept
    ({"act_granularity": "tensor"}, {"kernel": "int_mm", "act_granularity": "tensor"}, PER_TENSOR),
    ({"mode": "static"}, {"kernel": "int_mm"}, PER_TENSOR),
])
def test_with_changes_rederives_act_granularity(start, changes, act):
    s = LayerScheme(**start).with_changes(**changes)
    assert s.act_granularity == act
    for k, v in changes.items():
        if k != "act_granularity":
            assert getattr(s, k) == v


def test_a_kernel_change_keeps_per_tensor_activations():
    """A kernel change (or the same mode again) keeps the activation granularity: it can never make
    it invalid, so re-deriving it would only lose what the user asked for (before this was fixed,
    configs/per-tensor.toml with `--kernel int_mm`, or a recipe rule {"match": ..., "kernel":
    "int_mm"} under a per-tensor config, ran the layer per token)."""
    from qlin_cli.config import QuantConfig

    per_tensor = LayerScheme(granularity="tensor", act_granularity="tensor")
    assert per_tensor.with_changes(kernel="int_mm").act_granularity == PER_TENSOR
    assert QuantConfig(per_tensor).with_changes(kernel="fbgemm").act_granularity == PER_TENSOR
    rule = QuantConfig(per_tensor, layers=[{"match": "^2$", "kernel": "int_mm"}])
    assert rule.for_layer("2").act_granularity == PER_TENSOR
    assert per_tensor.with_changes(mode="dynamic").act_granularity == PER_TENSOR


def test_with_changes_ignores_none_and_keeps_the_rest():
    s = LayerScheme(mode="static", observer="mse", granularity="tensor", smooth=0.5)
    assert s.with_changes(mode=None, kernel=None, smooth=None) == s
    t = s.with_changes(symmetric=False)
    assert (t.mode, t.observer, t.granularity, t.smooth, t.symmetric) == ("static", "mse", PER_TENSOR, 0.5, False)
    assert s.symmetric is True  # the original is unchanged


def test_with_changes_validates():
    with pytest.raises(ConfigError, match="static mode calibrates one activation scale per tensor"):
        LayerScheme().with_changes(mode="static", act_granularity="token")
    with pytest.raises(ConfigError, match=expected("needs <mode> dynamic or static")):
        LayerScheme(smooth=0.5).with_changes(mode="weight-only")
    with pytest.raises(TypeError):
        LayerScheme().with_changes(colour="red")


def test_to_recipe_round_trip_for_every_valid_combination():
    valid, _ = all_combinations()
    extra = [LayerScheme(mode="static", observer="percentile", percentile=99.5, smooth=0.5, weight_observer="mse")]
    for s in valid + extra:
        r = s.to_recipe()
        # a round-to-nearest scheme's recipe has no rounding keys (its file's config stays as it was)
        assert set(r) == {f.name for f in dataclasses.fields(LayerScheme)} - set(ROUNDING_KEYS)
        assert isinstance(r["granularity"], str)
        assert r["act_granularity"] is None or isinstance(r["act_granularity"], str)
        assert LayerScheme(**r) == s


def test_to_recipe_keeps_what_to_dict_drops():
    s = LayerScheme(observer="mse", percentile=99.0)  # dynamic: the entry does not record them
    assert s.to_recipe()["observer"] == "mse" and s.to_recipe()["percentile"] == 99.0
    assert s.to_dict()["observer"] is None and "percentile" not in s.to_dict()


def test_hashable_and_frozen():
    s = LayerScheme(mode="static", smooth=0.5)
    assert hash(s) == hash(LayerScheme(mode="static", smooth=0.5))
    assert {s: 1}[LayerScheme(mode="static", smooth=0.5, act_granularity="tensor")] == 1
    assert s != LayerScheme(mode="static", smooth=0.25)
    for field, value in (("mode", "dynamic"), ("act_granularity", PER_TOKEN), ("smooth", None)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(s, field, value)
    assert s.mode == "static" and s.act_granularity == PER_TENSOR and s.smooth == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        PER_CHANNEL.name = "token"
