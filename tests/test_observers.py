"""Observers: ranges on constructed data, bounded state, shared reduction with the primitives."""

import pytest
import torch

from qlin_cli.config import PER_CHANNEL, PER_TENSOR
from qlin_cli.errors import ConfigError, InputError
from qlin_cli.observers import OBSERVERS, make_observer
from qlin_cli.primitives import choose_qparams, dequantize, quantize


def _feed(obs, x, chunks=10):
    for part in x.chunk(chunks):
        obs.update(part)
    return obs


def test_minmax_and_absmax_ranges():
    x = torch.tensor([[-3.0, 1.0], [2.0, 5.0], [0.5, -1.0]])
    obs = _feed(make_observer("minmax", PER_TENSOR), x, 3)
    assert [float(v) for v in obs.range()] == [-3.0, 5.0]
    obs = _feed(make_observer("absmax", PER_TENSOR), x, 3)
    assert [float(v) for v in obs.range()] == [-5.0, 5.0]
    assert int(obs.qparams(symmetric=False)[1]) == 0  # absmax is always symmetric
    obs = _feed(make_observer("minmax", PER_CHANNEL, axis=1), x, 3)  # per input channel (column)
    assert obs.range()[0].tolist() == [-3.0, -1.0] and obs.range()[1].tolist() == [2.0, 5.0]


def test_minmax_weight_observer_equals_direct_quantization():
    w = torch.randn(64, 32)
    for gran in (PER_TENSOR, PER_CHANNEL):
        for sym in (True, False):
            obs = make_observer("minmax", gran, axis=0)
            obs.update(w)
            a, b = obs.qparams(sym), choose_qparams(w, gran, sym)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_moving_average_is_an_ema_of_batch_ranges():
    obs = make_observer("moving-average", PER_TENSOR, averaging=0.5)
    obs.update(torch.tensor([[0.0, 4.0]]))
    obs.update(torch.tensor([[-2.0, 8.0]]))
    assert [float(v) for v in obs.range()] == [-1.0, 6.0]


def test_percentile_ignores_a_planted_outlier():
    torch.manual_seed(0)
    x = torch.randn(100_000, 1)
    x[123] = 500.0
    mm = _feed(make_observer("minmax", PER_TENSOR), x)
    pc = _feed(make_observer("percentile", PER_TENSOR, percentile=99.99), x)
    assert float(mm.range()[1]) == 500.0
    hi = float(pc.range()[1])
    assert 3.0 < hi < 6.0  # the 99.99th percentile of N(0, 1) is 3.72; the bins are ~0.25 wide
    assert float(pc.qparams(True)[0]) < float(mm.qparams(True)[0]) / 50


def test_mse_beats_minmax_on_heavy_tailed_data():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((200_000, 1))
    for sym in (True, False):
        errs = {}
        for name in ("minmax", "mse"):
            s, z = _feed(make_observer(name, PER_TENSOR), x).qparams(sym)
            errs[name] = float(((dequantize(quantize(x, s, z, sym), s, z) - x) ** 2).mean())
        assert errs["mse"] < 0.8 * errs["minmax"], (sym, errs)


def test_mse_keeps_the_full_range_of_uniform_data():
    x = torch.rand(50_000, 1)
    mm = _feed(make_observer("minmax", PER_TENSOR), x).qparams(False)
    mse = _feed(make_observer("mse", PER_TENSOR), x).qparams(False)
    assert torch.equal(mm[0], mse[0]) and torch.equal(mm[1], mse[1])


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_state_is_bounded_and_per_channel_shapes(name):
    obs = make_observer(name, PER_CHANNEL, axis=1)
    sizes = []
    for _ in range(6):
        obs.update(torch.randn(1000, 16))
        sizes.append(sum(t.numel() for t in vars(obs).values() if isinstance(t, torch.Tensor)))
    assert len(set(sizes[1:])) == 1  # state does not grow with the number of samples
    assert max(sizes) <= 16 * (2 * 2048 + 1) + 64
    s, z = obs.qparams(True)
    assert s.shape == (16,) and z.shape == (16,) and bool((s > 0).all())


def test_small_data_is_kept_exactly_and_large_data_in_bins():
    """A weight row of 128 values is kept exactly (the percentile is one of its values); past
    `bins` values per channel the observer switches to a fixed histogram."""
    w = torch.randn(4, 128)
    obs = make_observer("percentile", PER_CHANNEL, axis=0, percentile=99.0)
    obs.update(w)
    hi = obs.range()[1]
    assert all(float(hi[i]) in w[i].tolist() for i in range(4))
    obs.update(torch.randn(4, 4096))
    assert obs.points.shape == (4, 2048)


def test_errors():
    with pytest.raises(ConfigError, match="unknown observer 'kl'"):
        make_observer("kl", PER_TENSOR)
    with pytest.raises(ConfigError, match="saw no data"):
        make_observer("minmax", PER_TENSOR, what="layer 'fc'").range()
    with pytest.raises(InputError, match="layer 'fc': calibration input has 1 non-finite"):
        make_observer("minmax", PER_TENSOR, what="layer 'fc': calibration input").update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="percentile 40"):
        make_observer("percentile", PER_TENSOR, percentile=40)
