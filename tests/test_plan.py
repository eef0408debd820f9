"""make_plan: finding every nn.Linear (once, with its aliases), the layers that must stay float and
why (skip patterns, recipe rules, ties, MultiheadAttention, non-affine subclasses), and the affine
surrogates of nn.Linear subclasses. Carrying the plan out is tested in test_quantize.py."""

import pytest
import torch
import torch.nn as nn

from conftest import load_digits_mlp
from plan_models import GainLinear, Net, ScaledLinear, SquashLinear
from qlin_cli import QuantConfig, quantize_model
from qlin_cli.errors import InputError
from qlin_cli.plan import Plan, PlanEntry, affine_surrogate, effective_linear, find_linears, make_plan, swap_module
from qlin_cli.primitives import sqnr_db
from qlin_cli.scheme import LayerScheme


def test_plan_finds_every_linear_once_with_aliases_and_reasons():
    torch.manual_seed(0)
    model = Net().eval()
    found = find_linears(model)
    assert [(name, aliases) for name, _, aliases, _ in found] == [
        ("shared", ["heads.b"]), ("blocks.0.0", []), ("blocks.0.2", []), ("heads.a", []), ("scaled", []),
        ("attn.out_proj", []),
    ]
    assert found[0][1] is model.shared and found[-1][3] is model.attn  # the module, its parent
    plan = make_plan(model, QuantConfig(kernel="fbgemm"))
    by_name = {e.name: e for e in plan.entries}
    assert list(by_name) == [name for name, *_ in found]  # module order
    assert by_name["shared"].aliases == ("heads.b",) and by_name["shared"].paths == ["shared", "heads.b"]
    assert by_name["shared"].status == "quantized" and by_name["shared"].scheme == LayerScheme(kernel="fbgemm")
    assert by_name["scaled"].status == "quantized" and "affine map of ScaledLinear" in by_name["scaled"].reason
    # the plan holds no module: float layers free as they are swapped
    assert not any(isinstance(v, nn.Module) for e in plan.entries for v in vars(e).values())
    assert "Linear(" not in str(plan)
    assert by_name["attn.out_proj"].status == "skipped" and by_name["attn.out_proj"].scheme is None
    assert by_name["attn.out_proj"].reason == "nn.MultiheadAttention reads this layer's weight directly"
    assert not by_name["blocks.0.2"].has_bias and by_name["blocks.0.0"].has_bias
    assert (by_name["blocks.0.0"].out_features, by_name["blocks.0.0"].in_features) == (32, 16)
    assert {e.name for e in plan.quantized} == set(by_name) - {"attn.out_proj"}
    assert all(e.reason == "" for e in plan.quantized if e.name != "scaled")
    assert plan.calibration_need() is None
    # planning changes nothing in the model
    assert type(model.shared) is nn.Linear and model.shared is model.heads["b"]


@pytest.mark.parametrize("cls", [ScaledLinear, GainLinear])
def test_affine_subclasses_are_planned_as_their_effective_map(cls):
    torch.manual_seed(0)
    layer = cls(32, 16, bias=cls is ScaledLinear).eval()
    surrogate, note = affine_surrogate(layer)
    assert type(surrogate) is nn.Linear and note.startswith(f"affine map of {cls.__name__} (its own forward), fit ")
    assert surrogate.bias is not None  # GainLinear has no bias Parameter but adds a constant
    x = torch.randn(64, 32)
    with torch.no_grad():
        assert sqnr_db(layer(x), surrogate(x)) > 80  # the subclass's own function, to float rounding
    entry = make_plan(nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 4)), QuantConfig(kernel="fbgemm")).entries[0]
    assert entry.status == "quantized" and entry.reason == note and entry.has_bias
    assert torch.equal(effective_linear(layer, "0").weight, surrogate.weight)  # measured again, the same
    assert effective_linear(plain := nn.Linear(8, 4), "p") is plain
    plain = nn.Linear(8, 4)
    assert affine_surrogate(plain) == (plain, "")  # a plain Linear is its own map


def test_non_affine_subclass_is_kept_float_with_the_reason():
    model = nn.Sequential(SquashLinear(8, 8), nn.Linear(8, 2))
    surrogate, why = affine_surrogate(model[0])
    assert surrogate is None and "not affine (an affine fit gives" in why
    plan = make_plan(model, QuantConfig(kernel="fbgemm"))
    assert [e.status for e in plan.entries] == ["skipped", "quantized"]
    assert plan.entries[0].reason == why and plan.entries[0].scheme is None


def test_skip_patterns_keep_layers_float():
    plan = make_plan(load_digits_mlp(), QuantConfig(kernel="fbgemm", skip=(r"^4$",)))
    assert [e.status for e in plan.entries] == ["quantized", "quantized", "skipped"]
    assert plan.entries[2].reason == "matches --skip '^4$'" and plan.entries[2].scheme is None


def test_model_without_linear_is_an_error():
    with pytest.raises(InputError, match="no nn.Linear layer"):
        make_plan(nn.Sequential(nn.ReLU()), QuantConfig(kernel="fbgemm"))
    with pytest.raises(InputError, match="no nn.Linear layer"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_tied_weights_and_non_float_weights_stay_float():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight
            self.counts = nn.Linear(8, 2, dtype=torch.float32)
            self.counts.weight = nn.Parameter(torch.ones(2, 8, dtype=torch.int32), requires_grad=False)

    plan = make_plan(Tiny(), QuantConfig(kernel="fbgemm"))
    assert {e.name: (e.status, e.reason) for e in plan.entries} == {
        "body": ("quantized", ""), "head": ("skipped", "weight tied to emb"),
        "counts": ("skipped", "weight dtype torch.int32 is not a float dtype"),
    }
    # one module used at two paths is not a tie: it is quantized once, with an alias
    shared = nn.Linear(4, 4)
    plan = make_plan(nn.Sequential(shared, nn.ReLU(), shared), QuantConfig(kernel="fbgemm"))
    assert [(e.name, e.aliases, e.status) for e in plan.entries] == [("0", ("2",), "quantized")]


def test_recipe_rules_apply_per_layer():
    config = QuantConfig(kernel="fbgemm", mode="static", layers=[{"match": "^4$", "skip": True}, {"match": "^2$", "mode": "dynamic"}])
    plan = make_plan(load_digits_mlp(), config)
    modes = [(e.name, e.status, e.scheme and e.scheme.mode) for e in plan.entries]
    assert modes == [("0", "quantized", "static"), ("2", "quantized", "dynamic"), ("4", "skipped", None)]
    assert plan.entries[2].reason == "recipe rule match='^4$' skips it"
    assert [e.scheme for e in plan.entries[:2]] == [config.for_layer("0"), config.for_layer("2")]
    assert plan.entries[0].scheme is config.scheme and plan.entries[1].scheme.act_granularity is not None
    assert plan.calibration_need() == "static mode"
    smooth = make_plan(load_digits_mlp(), QuantConfig(kernel="fbgemm", layers=[{"match": "^2$", "smooth": 0.5}]))
    assert smooth.calibration_need() == "SmoothQuant (`smooth`)"
    assert [e.scheme.smooth for e in smooth.entries] == [None, 0.5, None]


def test_plan_round_trips_through_its_file_form():
    plan = make_plan(Net().eval(), QuantConfig(kernel="fbgemm", skip=("heads",)))
    back = Plan.from_list(plan.to_list())
    assert back == plan  # the surrogate is not part of the file's plan (nor of equality)
    assert [e.status for e in back.entries].count("skipped") == 2  # heads.a and attn.out_proj
    with pytest.raises(ValueError, match="has no valid 'in_features'"):
        PlanEntry.from_dict({**plan.to_list()[0], "in_features": "16"})


def test_swap_module_replaces_by_path_and_the_root():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    new = nn.Identity()
    assert swap_module(model, "1.0", new) is model and model[1][0] is new
    assert swap_module(model, "", new) is new


def test_auto_keeps_small_layers_float_in_the_plan_itself():
    """The speed decision is the plan's (from shape and scheme only), so the file
    records it and no loading machine can change what a layer computes. A subclass that is not
    affine keeps its own reason; weight-only and named kernels are not affected."""
    model = nn.Sequential(nn.Linear(256, 511), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 16))
    plan = make_plan(model, QuantConfig(layers=[{"match": "^4$", "mode": "weight-only"}]))
    assert [e.status for e in plan.entries] == ["skipped", "quantized", "quantized"]  # 130,816 < 2**17 <= 131,072
    assert plan.entries[0].reason.startswith("kept float for speed") and "(511, 256)" in plan.entries[0].reason
    assert [e.status for e in make_plan(model, QuantConfig(kernel="int_mm")).entries] == ["quantized"] * 3
