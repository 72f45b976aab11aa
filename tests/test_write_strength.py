"""write_strength: one write of (k, v), read at k, closes the fraction of v - M(k) the closed forms
give; `deepmemory bench write` prints the table."""

import pytest
import torch

from deepmemory.layers import KernelMemory, NeuralMemory
from deepmemory.models import build, write_strength
from deepmemory.models.presets import PRESETS
from deepmemory.models.write_strength import layer_write_strength

LINEAR = dict(architecture="linear", residual=False, loss="l2", window=1, chunk_size=4, step_bound=None)


def _inputs(layer, n=24, seed=1):
    return torch.randn(n, 1, layer.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _random_initial(layer):
    with torch.no_grad():  # a memory that already holds something: M_0(k) != 0
        for w in layer.initial_weights.values():
            w.normal_()
    return layer


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
def test_linear_l2_memory_closes_its_learning_rate(optimizer):
    """M_1(k) = M_0(k) + eta (v - M_0(k)) k^T k with unit k: exactly eta of the residual, eta the
    op's rate (max_lr sigmoid(x W_lr), times 1 - momentum where damped), at init and saturated."""
    torch.manual_seed(0)
    layer = _random_initial(NeuralMemory(32, 2, 8, optimizer=optimizer, use_decay=False, max_lr=0.3, **LINEAR))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    r = layer_write_strength(layer, _inputs(layer))
    assert r["init"].shape == (24, 2)
    torch.testing.assert_close(r["init"], r["step_init"], rtol=1e-10, atol=1e-13)
    assert r["init"].std() > 1e-4  # the gates vary with x: a constant would not test the match
    torch.testing.assert_close(r["saturated"], torch.full_like(r["saturated"], 0.3), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(r["step_saturated"], torch.full_like(r["step_saturated"], 0.3))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())  # the layer is untouched
    if optimizer == "momentum":  # damped: rate 0.3 * sigmoid(.) * (1 - 0.9) at init
        assert 0.002 < r["init"].mean() < 0.004


def test_forgetting_counts_in_the_write():
    """With decay d the write is M_1 = (1 - d) M_0 + eta (v - M_0 k) k^T: the read at k moves by
    eta r - d M_0(k), so the closed fraction is eta - d <M_0(k), r> / |r|^2 (r = v - M_0(k))."""
    torch.manual_seed(0)
    layer = _random_initial(NeuralMemory(32, 2, 8, optimizer="gd", use_decay=True, max_lr=0.3, **LINEAR))
    layer = layer.double()
    x = _inputs(layer)
    r = layer_write_strength(layer, x)
    with torch.no_grad():
        _, k, v, _ = layer.qkv(x, None)
        m0 = torch.einsum("hij,bthj->bthi", layer.initial_weights["w0"], k)[:, 0]
        res = v[:, 0] - m0
        decay = torch.sigmoid(layer.decay_proj(x))[:, 0]
        expected = r["step_init"] - decay * (m0 * res).sum(-1) / res.pow(2).sum(-1)
    torch.testing.assert_close(r["init"], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r["saturated"], torch.full_like(r["saturated"], 0.3), rtol=1e-10, atol=1e-13)


def test_kernel_memory_linear_closed_form():
    """The kernel form's linear memory with the l2 loss from empty: M_1(k) = lr v exp(tau k.k), a
    fraction lr e^tau (tau = sqrt(head_dim) at init)."""
    torch.manual_seed(0)
    layer = KernelMemory(
        32, 2, 16, depth=1, residual=False, loss="l2", normalized=False, chunk_size=1, max_lr=1e-3, step_bound=None
    )
    r = layer_write_strength(layer, _inputs(layer))
    tau = layer.log_temp.detach().double().exp()
    torch.testing.assert_close(r["init"], r["step_init"] * tau.exp(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(r["saturated"], 1e-3 * tau.exp().expand_as(r["saturated"]), rtol=1e-10, atol=1e-13)


def test_presets():
    gdn = write_strength("gated-deltanet", samples=16)
    assert gdn.family == "linear l2 gd forget-first" and len(gdn.layers) == 2
    assert gdn.saturated == pytest.approx(1.0, abs=1e-12)  # beta = 1 on a unit key closes everything
    assert 0.05 < gdn.init < 0.2 and gdn.init == pytest.approx(gdn.step_init, rel=1e-9)  # beta ~ 0.1 at init
    # a model is measured as it is (the same weights give the same numbers)
    torch.manual_seed(0)
    assert write_strength(build("titans-mac"), samples=16) == write_strength("titans-mac", samples=16)
    titans = write_strength("titans-mac", samples=16)
    assert titans.family == "mlp l2 momentum LN" and 0 < titans.init < titans.saturated


MEMORY_PRESETS = [n for n in PRESETS if PRESETS[n][1] is not None and n != "gated-deltanet"]


@pytest.mark.parametrize("name", MEMORY_PRESETS)
def test_every_memory_preset_writes_at_least_a_third_of_gated_deltanets(name):
    """docs/fidelity.md#calibration: at init one write of every memory preset closes at least a third
    of what Gated DeltaNet's does (beta ~ 0.1: ~10% of v - M(k)); before the calibration Titans'
    closed 0.03%."""
    gdn = write_strength("gated-deltanet", samples=8).init
    assert write_strength(name, samples=8).init >= gdn / 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="Transformer|no memory layer"):
        write_strength("transformer")
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        write_strength("titans-lmm", samples=0)
    with pytest.raises(ValueError, match="overrides .* apply to a preset name"):
        write_strength(build("titans-lmm"), hidden_size=32)
    with pytest.raises(TypeError, match="layer must be a NeuralMemory or KernelMemory"):
        layer_write_strength(torch.nn.Linear(2, 2), torch.zeros(1, 1, 2))
    layer = NeuralMemory(32, 2, 8)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 32\]"):
        layer_write_strength(layer, torch.zeros(2, 3, 32))


def test_bench_write_cli(capsys):
    from deepmemory.cli import main

    assert main(["bench", "write", "--models", "swla", "gated-deltanet", "--samples", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("write strength: one write of (k, v), read at k")
    assert lines[1].split()[:3] == ["preset", "family", "step"]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert set(rows) == {"swla", "gated-deltanet"}
    assert rows["gated-deltanet"].split()[-1] == "1" and rows["gated-deltanet"].split()[-2] == "100%"
    assert main(["bench", "write", "--models", "transformer"]) == 2
    assert "unknown memory preset 'transformer'" in capsys.readouterr().err
    assert main(["bench", "write", "--size", "7b"]) == 2
    assert "unknown size '7b'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "write", "--samples", "0"])
    assert exit_.value.code == 2 and "--samples: must be >= 1" in capsys.readouterr().err
