"""impl="triton" against impl="chunk": outputs, states and every gradient; streaming; unwritten outputs; errors.

Without CUDA the kernels run under the Triton interpreter (slow: tiny shapes only).
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytestmark = pytest.mark.kernels

from ops_cases import make_inputs, make_params, rel_err  # noqa: E402

from deepmemory.ops import neural_memory  # noqa: E402
from deepmemory.ops import triton_chunk as tc  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NH, D, HIDDEN = 2, 16, 32


def _inputs(
    bsz, seq, dtype, *, d=D, dv=None, hidden=HIDDEN, architecture="linear", optimizer="momentum", seed=0, batched=False
):
    dv = d if dv is None else dv
    # lr_scale 0.5 keeps a window of 5 summed gradients stable (the memory stays O(1))
    ins = [x.to(DEVICE, dtype) for x in make_inputs(bsz, seq, NH, d, dv, optimizer=optimizer, seed=seed, lr_scale=0.5)]
    gen = torch.Generator().manual_seed(seed + 1)
    params = make_params(architecture, NH, d, dv, hidden, batch=bsz if batched else None, gen=gen)
    return ins, {n: t.to(DEVICE, dtype) for n, t in params.items()}


def _run(impl, ins, params, **kw):
    """Outputs, final state and the gradients of a random projection of both w.r.t. every input."""
    leaves = [x.detach().clone().requires_grad_() for x in ins]
    q, k, v, lr, mom, dec, gam = leaves
    ps = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
    o, st = neural_memory(
        q,
        k,
        v,
        lr,
        None if kw.get("optimizer") == "gd" else mom,
        dec,
        ps,
        window_gate=gam,
        output_final_state=True,
        impl=impl,
        **kw,
    )
    outs = [o] + [t for n in ps for t in (st.weights[n], st.momentum[n], st.chunk_weights[n], st.chunk_momentum[n])]
    gen = torch.Generator().manual_seed(7)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)).sum() for x in outs)
    wanted = leaves if kw.get("optimizer") != "gd" else [x for x in leaves if x is not mom]
    grads = torch.autograd.grad(loss, wanted + list(ps.values()))
    return outs, grads


def _assert_close(got, want, tol, live=True):
    """``live``: every gradient is nonzero (false for one token, whose momentum meets a zero state)."""
    outs_t, grads_t = got
    outs_c, grads_c = want
    assert outs_c[0].abs().max() < 1e3, "the memory diverged: the comparison would say little"
    for i, (a, b) in enumerate(zip(outs_t, outs_c)):
        assert rel_err(a, b) <= tol, f"output {i}: {rel_err(a, b):.2e}"
    for i, (a, b) in enumerate(zip(grads_t, grads_c)):
        assert torch.isfinite(a).all() and (b.abs().max() > 0 or not live), f"gradient {i} is zero"
        assert rel_err(a, b) <= tol, f"gradient {i}: {rel_err(a, b):.2e}"


CASES = [  # (seq, chunk, window, loss, optimizer)
    (1, 4, 1, "l2", "momentum"),
    (7, 4, 1, "l2", "gd"),
    (33, 4, 5, "dot", "momentum"),
    (33, 16, 5, "l2", "momentum"),
    (7, 16, 5, "dot", "gd"),
]


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("seq,chunk,window,loss,optimizer", CASES)
def test_matches_chunk_float64(memory, seq, chunk, window, loss, optimizer):
    ins, params = _inputs(2, seq, torch.float64, architecture=memory, optimizer=optimizer)
    kw = dict(architecture=memory, loss=loss, optimizer=optimizer, window=window, chunk_size=chunk)
    _assert_close(_run("triton", ins, params, **kw), _run("chunk", ins, params, **kw), 1e-10, live=seq > 1)


@pytest.mark.parametrize("optimizer,window", [("gd", 3), ("momentum", 1)])
def test_step_bound_matches_chunk(optimizer, window):
    """The stale-step bound (linear memory, whose inputs are its keys): every chunk's factors built
    once from the layout, as impl="chunk" builds them chunk by chunk; a bound that acts here."""
    ins, params = _inputs(2, 13, torch.float64, optimizer=optimizer)
    kw = dict(architecture="linear", optimizer=optimizer, window=window, chunk_size=4)
    bounded = _run("triton", ins, params, step_bound=0.3, **kw)
    _assert_close(bounded, _run("chunk", ins, params, step_bound=0.3, **kw), 1e-10)
    assert rel_err(bounded[0][0], _run("triton", ins, params, **kw)[0][0]) > 1e-3


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("seq,chunk,window,loss,optimizer", [(33, 4, 5, "l2", "momentum"), (19, 16, 1, "dot", "gd")])
def test_state_split_into_blocks(memory, seq, chunk, window, loss, optimizer, monkeypatch):
    """Rows of the linear state spread over programs, hidden units swept in blocks (the last ragged)."""
    monkeypatch.setattr(tc, "V_BLOCK", 16)
    monkeypatch.setattr(tc, "H_BLOCK", 16)
    ins, params = _inputs(
        2,
        seq,
        torch.float64,
        d=24,
        dv=40 if memory == "linear" else 24,
        hidden=40,
        architecture=memory,
        optimizer=optimizer,
    )
    kw = dict(architecture=memory, loss=loss, optimizer=optimizer, window=window, chunk_size=chunk)
    _assert_close(_run("triton", ins, params, **kw), _run("chunk", ins, params, **kw), 1e-10)


@pytest.mark.parametrize("loss", ["l2", "dot"])
def test_mlp_without_residual(loss):
    # what the layer runs under a feature map; the key and value widths differ
    ins, params = _inputs(2, 33, torch.float64, d=16, dv=12, architecture="mlp")
    kw = dict(architecture="mlp", residual=False, loss=loss, optimizer="momentum", window=5, chunk_size=4)
    _assert_close(_run("triton", ins, params, **kw), _run("chunk", ins, params, **kw), 1e-10)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_matches_chunk_float32_ragged_dims(memory):
    # widths that are not powers of two exercise the masked tiles; per-sequence initial memory
    ins, params = _inputs(1, 33, torch.float32, d=12, hidden=20, architecture=memory, batched=True)
    kw = dict(architecture=memory, loss="l2", optimizer="momentum", window=5, chunk_size=4)
    _assert_close(_run("triton", ins, params, **kw), _run("chunk", ins, params, **kw), 2e-5)


def test_half_precision_inputs_follow_chunk():
    ins, params = _inputs(1, 7, torch.bfloat16, architecture="mlp")
    kw = dict(architecture="mlp", window=5, chunk_size=4)
    o_t, st_t = neural_memory(*ins[:6], params, window_gate=ins[6], impl="triton", output_final_state=True, **kw)
    o_c, st_c = neural_memory(*ins[:6], params, window_gate=ins[6], impl="chunk", output_final_state=True, **kw)
    assert o_t.dtype == torch.bfloat16 and st_t.weights["w0"].dtype == torch.float32
    assert rel_err(o_t.float(), o_c.float()) <= 1e-2
    # half-precision callers get TF32 products on a GPU; the interpreter computes them in float32
    assert rel_err(st_t.weights["w1"], st_c.weights["w1"]) <= (1e-5 if DEVICE == "cpu" else 5e-3)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_streaming_through_triton(memory):
    """Split calls carrying the state equal one call, and gradients flow through the state."""
    seq, cut = 19, 6
    ins, params = _inputs(1, seq, torch.float64, architecture=memory)
    kw = dict(architecture=memory, window=5, chunk_size=4)
    o, st = neural_memory(*ins[:6], params, window_gate=ins[6], impl="triton", output_final_state=True, **kw)
    head = [x[:, :cut] for x in ins]
    tail = [x[:, cut:] for x in ins]
    results = {}
    for impl in ("triton", "chunk"):
        leaves = [x.detach().clone().requires_grad_() for x in head]
        o1, s1 = neural_memory(*leaves[:6], params, window_gate=leaves[6], impl=impl, output_final_state=True, **kw)
        o2, s2 = neural_memory(
            *tail[:6], params, window_gate=tail[6], impl=impl, initial_state=s1, output_final_state=True, **kw
        )
        gen = torch.Generator().manual_seed(3)
        loss = (o2 * torch.randn(o2.shape, generator=gen, dtype=o2.dtype).to(o2.device)).sum()
        results[impl] = (torch.cat([o1, o2], 1), s2, torch.autograd.grad(loss, leaves[1:]))  # all but q
    o_t, s_t, g_t = results["triton"]
    assert rel_err(o_t, o) <= 1e-10
    for n in st.weights:
        assert rel_err(s_t.weights[n], st.weights[n]) <= 1e-10
        assert rel_err(s_t.chunk_momentum[n], st.chunk_momentum[n]) <= 1e-10
    for a, b in zip(g_t, results["chunk"][2]):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_every_output_is_written(memory, monkeypatch):
    """Kernel outputs start as NaN; ragged lengths must still come back fully written."""
    monkeypatch.setattr(
        tc, "_empty", lambda *shape, like: torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    )
    for seq, chunk, window in ((7, 4, 5), (33, 16, 1)):
        ins, params = _inputs(2, seq, torch.float64, d=12, hidden=20, architecture=memory)
        kw = dict(architecture=memory, window=window, chunk_size=chunk)
        outs, grads = _run("triton", ins, params, **kw)
        assert all(torch.isfinite(x).all() for x in (*outs, *grads))
        _assert_close((outs, grads), _run("chunk", ins, params, **kw), 1e-10)


@pytest.mark.parametrize(
    "bad",
    [
        dict(optimizer="muon"),
        dict(granularity="chunk"),
        dict(architecture="gated_mlp"),
        dict(architecture="mlp", depth=3),
        dict(architecture="mlp", activation="silu"),
    ],
)
def test_unsupported_settings_raise(bad):
    memory, depth = bad.get("architecture", "linear"), bad.get("depth", 2)
    ins, _ = _inputs(1, 3, torch.float64)
    params = {n: t.to(DEVICE) for n, t in make_params(memory, NH, D, D, HIDDEN, depth=depth).items()}
    with pytest.raises(ValueError, match="impl='triton' supports"):
        neural_memory(*ins[:6], params, impl="triton", **{"architecture": memory, **bad})


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "deepmemory.ops.triton_chunk")
    ins, params = _inputs(1, 3, torch.float64)
    with pytest.raises(ImportError, match="needs the triton package"):
        neural_memory(*ins[:6], params, architecture="linear", impl="triton")


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_long_sequence_many_chunks(memory):
    ins, params = _inputs(1, 257, torch.float64, architecture=memory)
    kw = dict(architecture=memory, loss="l2", optimizer="momentum", window=3, chunk_size=16)
    _assert_close(_run("triton", ins, params, **kw), _run("chunk", ins, params, **kw), 1e-9)


def test_layer_with_feature_map_matches_chunk():
    """An OmegaNet-style layer (polynomial keys, window, momentum) trains the same through either impl."""
    from deepmemory.layers import NeuralMemory

    torch.manual_seed(0)
    layer = (
        NeuralMemory(
            32,
            2,
            8,
            chunk_size=4,
            architecture="mlp",
            expansion=2,
            window=4,
            feature_map="polynomial",
            impl="triton",
            step_bound=None,
        )
        .double()
        .to(DEVICE)
    )
    x = torch.randn(2, 11, 32, dtype=torch.float64, device=DEVICE)
    results = {}
    for impl in ("triton", "chunk"):
        layer.impl = impl
        layer.zero_grad()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=DEVICE).view_as(y)).sum().backward()
        results[impl] = (y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
    assert rel_err(results["triton"][0], results["chunk"][0]) <= 1e-10
    assert results["triton"][1].keys() == results["chunk"][1].keys()
    for n, g in results["chunk"][1].items():
        assert rel_err(results["triton"][1][n], g) <= 1e-10, n


def test_kernels_fit_an_h100():
    """Compiled for sm_90 (no GPU needed), every kernel at d=64, hidden 256, chunk 16 fits in shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "deepmemory.bench.triton_resources", "--dtype", "bf16", "--chunk", "16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("linear", "mlp"))]
    assert len(rows) == 6 and all(int(row[-3]) <= 227 for row in rows), r.stdout
