"""Model inputs and running models on them (qlin_cli.data)."""

from dataclasses import dataclass

import pytest
import torch

from qlin_cli.data import OtherLoad, batches, first_tensor, time_models
from qlin_cli.errors import InputError


@dataclass
class Out:
    loss: torch.Tensor | None
    logits: torch.Tensor


def test_first_tensor_of_structured_outputs():
    t = torch.ones(2)
    assert first_tensor(t) == (t, "output")
    assert first_tensor((t, 3))[1] == "output[0]"
    assert first_tensor({"last_hidden_state": t})[1] == "output['last_hidden_state']"
    assert first_tensor(Out(None, t))[1] == "output['logits']"
    assert first_tensor([None, (t,)])[1] == "output[1][0]"
    with pytest.raises(InputError, match="holds no tensor"):
        first_tensor({"a": 1})


def test_batches_slice_tensors_and_dicts():
    x = torch.arange(10)
    assert [b.tolist() for b in batches(x, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    d = {"input_ids": torch.arange(5), "mask": torch.ones(5)}
    assert [len(b["mask"]) for b in batches(d, 2)] == [2, 2, 1]


def test_latency_is_measured_for_each_model_with_its_spread():
    models = [torch.nn.Linear(4, 4), torch.nn.Identity()]
    seen = []
    t = time_models(models, torch.randn(10, 4), batch_size=4, repeats=3, progress=lambda *a: seen.append(a))
    assert len(t.latencies_ms) == 2 and all(0 < lo <= mid <= hi for lo, mid, hi in t.latencies_ms)
    assert t.batch_size == 4 and t.forwards == 3 * 2  # the last 2 samples are not a full batch: not timed
    assert seen == [(i, 6, "timing") for i in range(1, 7)]
    small = time_models(models, torch.randn(3, 4), batch_size=64, repeats=2)
    assert small.batch_size == 3 and small.forwards == 2  # fewer samples than a batch: the batch used is 3


def test_other_load_sees_a_busy_process():
    """A process spinning on one core for 0.6 s: OtherLoad counts it (and not this process's own
    work, here sleeping)."""
    import subprocess
    import sys
    import time as _time

    spinner = subprocess.Popen([sys.executable, "-S", "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        _time.sleep(0.3)
        with OtherLoad() as load:
            _time.sleep(0.6)
    finally:
        spinner.kill()
        spinner.wait()
    if load.cores is None:
        pytest.skip("no /proc here")
    assert load.cores > 0.5
