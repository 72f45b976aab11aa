"""Packed documents (``cu_seqlens``) in the ops and the token-mixer layers: a packed row of
documents of awkward lengths gives exactly what each document gives alone (outputs and every
gradient, float64, <= 1e-8), and malformed boundaries give one-line errors.

Each test also checks that the boundaries matter: the packed row read as one sequence (no
``cu_seqlens``) differs from the documents read alone, so the comparison can fail.
"""

import pytest
import torch
import torch.nn.functional as F
from ops_cases import make_params, rel_err

from deepmemory.layers.attention import Attention
from deepmemory.layers.kernel_memory import KernelMemory
from deepmemory.layers.memory_layer import NeuralMemory
from deepmemory.ops import KernelRule, UpdateRule, kernel_memory, neural_memory

NH, DK, DV, HIDDEN = 2, 6, 5, 8
LONG = (1, 7, 63, 100, 20)  # boundaries inside chunks of 8, a lone token, the longest not first
SHORT = (1, 7, 30, 13)  # for the token loops (and one-token chunks, Muon per token)
TOL = 1e-8


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _random(shape, gen, low=None, high=None):
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    if low is not None:
        x = low + (high - low) * torch.rand(*shape, dtype=torch.float64, generator=gen)
    return x


def _compare(fn, tokens, params, lengths):
    """``fn(*tokens, cu_seqlens=...) -> [1, T, ...]`` on the packed row against ``fn`` on each
    document alone, concatenated: outputs and the gradients of a random projection w.r.t. every
    token input and every parameter."""
    cu = _cu(lengths)
    leaves = list(tokens) + list(params)

    def grads(out):
        gen = torch.Generator().manual_seed(11)
        proj = torch.randn(out.shape, dtype=out.dtype, generator=gen)
        return torch.autograd.grad((out * proj).sum(), leaves)

    packed = fn(*tokens, cu_seqlens=cu)
    g_packed = grads(packed)
    bounds = cu.tolist()
    alone = torch.cat([fn(*(t[:, s:e] for t in tokens)) for s, e in zip(bounds[:-1], bounds[1:])], 1)
    g_alone = grads(alone)
    assert packed.shape == alone.shape
    assert torch.isfinite(alone).all() and alone.abs().max() < 1e3, "diverged: the comparison would say little"
    assert rel_err(packed, alone) <= TOL, f"outputs: {rel_err(packed, alone):.2e}"
    for i, (a, b) in enumerate(zip(g_packed, g_alone)):
        assert b.abs().max() > 0, f"gradient {i} is zero"
        assert rel_err(a, b) <= TOL, f"gradient {i}: {rel_err(a, b):.2e}"
    with torch.no_grad():  # the boundaries matter: one sequence reads otherwise
        whole = fn(*tokens)
    assert not torch.allclose(whole, alone, rtol=0.0, atol=1e-3)  # (or the whole row diverges)


# ---------------------------------------------------------------------------------------------
# neural_memory

# (architecture, optimizer, granularity, window, impl, loss): every value of each axis, sampled
MEMORY_CASES = [
    ("linear", "gd", "token", 1, "chunk", "l2"),
    ("linear", "momentum", "chunk", 4, "chunk", "dot"),
    ("mlp", "momentum", "token", 4, "chunk", "l2"),
    ("mlp", "muon", "token", 1, "chunk", "l2"),
    ("mlp", "gd", "chunk", 4, "chunk", "l2"),
    ("gated_mlp", "momentum", "token", 4, "chunk", "l2"),
    ("gated_mlp", "muon", "chunk", 1, "chunk", "dot"),
    ("linear", "muon", "token", 4, "reference", "l2"),
    ("mlp", "momentum", "token", 4, "reference", "l2"),
    ("mlp", "gd", "chunk", 1, "reference", "dot"),
]


def _memory_inputs(seq, architecture, optimizer, window, seed=0, dv=DV):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(_random((1, seq, NH, DK), gen), dim=-1)
    k = F.normalize(_random((1, seq, NH, DK), gen), dim=-1)
    v = _random((1, seq, NH, dv), gen)
    lr = _random((1, seq, NH), gen, 0.02, 0.1 if optimizer == "muon" else 0.25)
    momentum = _random((1, seq, NH), gen, 0.1, 0.9) if optimizer != "gd" else None
    decay = _random((1, seq, NH), gen, 0.0, 0.2)
    gate = _random((1, seq, NH), gen, 0.2, 1.0) if window > 1 else None
    tokens = [t.requires_grad_() for t in (q, k, v, lr, momentum, decay, gate) if t is not None]
    return tokens, (momentum is not None, gate is not None)


def _memory_fn(has, weights, **kw):
    has_mom, has_gate = has

    def fn(*t, cu_seqlens=None):
        t = list(t)
        q, k, v, lr = t[:4]
        momentum = t[4] if has_mom else None
        decay = t[4 + has_mom]
        gate = t[5 + has_mom] if has_gate else None
        return neural_memory(q, k, v, lr, momentum, decay, weights, window_gate=gate, cu_seqlens=cu_seqlens, **kw)[0]

    return fn


@pytest.mark.parametrize("architecture,optimizer,granularity,window,impl,loss", MEMORY_CASES)
def test_neural_memory_packed_equals_each_alone(architecture, optimizer, granularity, window, impl, loss):
    token_muon = optimizer == "muon" and granularity == "token"  # a Newton–Schulz per token
    lengths = SHORT if impl == "reference" or token_muon else LONG
    dv = DK if architecture != "linear" else DV  # residual memories need dk == dv
    tokens, has = _memory_inputs(sum(lengths), architecture, optimizer, window, dv=dv)
    gen = torch.Generator().manual_seed(3)
    weights = {n: w.requires_grad_() for n, w in make_params(architecture, NH, DK, dv, HIDDEN, gen=gen).items()}
    rule = UpdateRule(
        architecture=architecture,
        optimizer=optimizer,
        granularity=granularity,
        window=window,
        loss=loss,
        chunk_size=8,
        ns_steps=3,
    )
    _compare(_memory_fn(has, weights, rule=rule, impl=impl), tokens, list(weights.values()), lengths)


def test_neural_memory_packed_per_batch_weights():
    """Initial weights given per batch element ``[1, H, rows, cols]`` are every document's."""
    tokens, has = _memory_inputs(sum(SHORT), "mlp", "momentum", 1, dv=DK)
    gen = torch.Generator().manual_seed(3)
    weights = {n: w.requires_grad_() for n, w in make_params("mlp", NH, DK, DK, HIDDEN, batch=1, gen=gen).items()}
    _compare(_memory_fn(has, weights, architecture="mlp", chunk_size=8), tokens, list(weights.values()), SHORT)


def test_gated_deltanet_packed_equals_each_alone():
    """The exact Gated DeltaNet path (WY form of the delta rule inside impl="chunk")."""
    tokens, has = _memory_inputs(sum(LONG), "linear", "gd", 1)
    weights = {
        "w0": (
            0.3 * torch.randn(NH, DV, DK, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        ).requires_grad_()
    }
    rule = UpdateRule(architecture="linear", loss="l2", optimizer="gd", window=1, chunk_size=1, decay_first=True)
    _compare(_memory_fn(has, weights, rule=rule), tokens, [weights["w0"]], LONG)


@pytest.mark.kernels
def test_neural_memory_packed_triton():
    """impl="triton" (under the Triton interpreter without CUDA: tiny shapes)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # conftest turns the interpreter on without CUDA
    lengths = (1, 6, 11)
    tokens, has = _memory_inputs(sum(lengths), "mlp", "momentum", 3, dv=DK)
    tokens = [t.detach().to(device).requires_grad_() for t in tokens]
    gen = torch.Generator().manual_seed(3)
    weights = {n: w.to(device).requires_grad_() for n, w in make_params("mlp", NH, DK, DK, HIDDEN, gen=gen).items()}
    rule = UpdateRule(architecture="mlp", optimizer="momentum", window=3, chunk_size=4)
    fn = _memory_fn(has, weights, rule=rule, impl="triton")
    _compare(
        lambda *t, cu_seqlens=None: fn(*t, cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device)).cpu(),
        tokens,
        list(weights.values()),
        lengths,
    )


# ---------------------------------------------------------------------------------------------
# kernel_memory

# (depth, loss, window, window_rule, normalized, chunk_size, impl)
KERNEL_CASES = [
    (2, "dot", None, "omega", True, 8, "chunk"),
    (1, "dot", None, "omega", False, 8, "chunk"),
    (2, "l2", 4, "omega", True, 8, "chunk"),
    (1, "dot", 4, "swa", True, 8, "chunk"),
    (2, "l2", 4, "swa", False, 1, "chunk"),
    (2, "dot", 4, "omega", True, 8, "reference"),
    (2, "l2", 4, "swa", True, 8, "reference"),
]


@pytest.mark.parametrize("depth,loss,window,window_rule,normalized,chunk_size,impl", KERNEL_CASES)
def test_kernel_memory_packed_equals_each_alone(depth, loss, window, window_rule, normalized, chunk_size, impl):
    lengths = SHORT if impl == "reference" or chunk_size == 1 else LONG
    seq = sum(lengths)
    gen = torch.Generator().manual_seed(5)
    q = F.normalize(_random((1, seq, NH, DK), gen), dim=-1).requires_grad_()
    k = F.normalize(_random((1, seq, NH, DK), gen), dim=-1).requires_grad_()
    v = _random((1, seq, NH, DK), gen).requires_grad_()
    lr = _random((1, seq, NH), gen, 0.1, 0.5).requires_grad_()
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    rule = KernelRule(
        depth=depth, loss=loss, window=window, window_rule=window_rule, normalized=normalized, chunk_size=chunk_size
    )
    weights = {n: (_random((NH, r, c), gen) / c**0.5).requires_grad_() for n, (r, c) in rule.shapes(DK, HIDDEN).items()}

    def fn(q, k, v, lr, cu_seqlens=None):
        return kernel_memory(q, k, v, lr, weights, scale, rule=rule, impl=impl, cu_seqlens=cu_seqlens)[0]

    _compare(fn, [q, k, v, lr], [scale, *weights.values()], lengths)


# ---------------------------------------------------------------------------------------------
# the layers


def _layer_compare(layer, lengths=LONG, seed=7):
    layer = layer.double()
    gen = torch.Generator().manual_seed(seed)
    x = _random((1, sum(lengths), layer.hidden_size), gen).requires_grad_()

    def fn(x, cu_seqlens=None):
        return layer(x, cu_seqlens=cu_seqlens)

    _compare(fn, [x], [p for p in layer.parameters()], lengths)


@pytest.mark.parametrize("window,num_persistent", [(None, 0), (5, 0), (None, 3), (5, 3)])
def test_attention_packed_equals_each_alone(window, num_persistent):
    torch.manual_seed(0)
    _layer_compare(Attention(16, 2, 8, window=window, num_persistent=num_persistent))


LAYER_MEMORIES = [
    dict(optimizer="momentum", window=3),  # Titans' MLP memory, an Omega window across boundaries
    dict(
        architecture="linear", loss="l2", optimizer="gd", chunk_size=1, decay_first=True, decay_gate="mamba2"
    ),  # Gated DeltaNet
]


@pytest.mark.parametrize("kw", LAYER_MEMORIES)
def test_neural_memory_layer_packed_equals_each_alone(kw):
    torch.manual_seed(0)
    kw = dict(dict(chunk_size=8, expansion=2), **kw)
    _layer_compare(NeuralMemory(16, 2, 8, conv_size=4, **kw))


@pytest.mark.parametrize("window,window_rule", [(None, "omega"), (4, "swa")])
def test_kernel_memory_layer_packed_equals_each_alone(window, window_rule):
    torch.manual_seed(0)
    _layer_compare(
        KernelMemory(16, 2, 8, window=window, window_rule=window_rule, chunk_size=8, expansion=2, conv_size=4)
    )


# ---------------------------------------------------------------------------------------------
# bad input


def _calls():
    """Each target as ``call(batch, seq, cu_seqlens, **extra)`` on random inputs (``extra``:
    ``output_final_state=True`` for the ops, ``return_state=True`` for the layers)."""
    gen = torch.Generator().manual_seed(0)

    def memory(bsz, seq, cu, **kw):
        q = F.normalize(_random((bsz, seq, NH, DK), gen), dim=-1)
        lr = _random((bsz, seq, NH), gen, 0.1, 0.5)
        w = make_params("linear", NH, DK, DK, HIDDEN, gen=gen)
        return neural_memory(q, q, q, lr, None, None, w, architecture="linear", optimizer="gd", cu_seqlens=cu, **kw)

    def kernel(bsz, seq, cu, **kw):
        q = F.normalize(_random((bsz, seq, NH, DK), gen), dim=-1)
        lr = _random((bsz, seq, NH), gen, 0.1, 0.5)
        return kernel_memory(
            q, q, q, lr, {}, torch.ones(NH, dtype=torch.float64), rule=KernelRule(depth=1), cu_seqlens=cu, **kw
        )

    def layer(module):
        module = module.double()

        def call(bsz, seq, cu, **kw):
            kw = {"return_state": True} if kw else {}
            return module(_random((bsz, seq, 16), gen), cu_seqlens=cu, **kw)

        return call

    torch.manual_seed(0)
    return {
        "neural_memory": memory,
        "kernel_memory": kernel,
        "Attention": layer(Attention(16, 2, 8)),
        "NeuralMemory": layer(NeuralMemory(16, 2, 8, chunk_size=4)),
        "KernelMemory": layer(KernelMemory(16, 2, 8, chunk_size=4)),
    }


BAD = [  # (batch, cu_seqlens, extra keywords, error, message)
    (1, torch.tensor([1, 4, 9]), {}, ValueError, "must start at 0 and end at the sequence length 9; got 1"),
    (1, torch.tensor([0, 4, 8]), {}, ValueError, "must start at 0 and end at the sequence length 9; got 0 ... 8"),
    (1, torch.tensor([0, 4, 4, 9]), {}, ValueError, "strictly increasing"),
    (1, torch.tensor([0, 6, 4, 9]), {}, ValueError, "strictly increasing"),
    (1, torch.tensor([0.0, 4.0, 9.0]), {}, TypeError, "must be int32 or int64; got torch.float32"),
    (1, [0, 4, 9], {}, TypeError, "must be a torch.Tensor; got list"),
    (1, torch.tensor([[0, 4, 9]]), {}, ValueError, r"must be 1-D \[N \+ 1\]"),
    (1, torch.tensor([0]), {}, ValueError, r"must be 1-D \[N \+ 1\]"),
    (2, torch.tensor([0, 4, 9]), {}, ValueError, "the batch must be 1; got 2"),
    (1, torch.tensor([0, 4, 9]), {"output_final_state": True}, ValueError, "starts every document empty"),
]


@pytest.mark.parametrize("target", ["neural_memory", "kernel_memory", "Attention", "NeuralMemory", "KernelMemory"])
@pytest.mark.parametrize("bsz,cu,extra,error,message", BAD)
def test_bad_cu_seqlens_one_line_error(target, bsz, cu, extra, error, message):
    call = _calls()[target]
    with pytest.raises(error, match=message) as info:
        call(bsz, 9, cu, **extra)
    assert "\n" not in str(info.value)


def test_state_with_cu_seqlens_is_refused():
    """``initial_state`` / a layer ``state`` with ``cu_seqlens``: one-line ValueError."""
    cu = torch.tensor([0, 4, 9])
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(_random((1, 9, NH, DK), gen), dim=-1)
    lr = _random((1, 9, NH), gen, 0.1, 0.5)
    w = make_params("linear", NH, DK, DK, HIDDEN, gen=gen)
    _, st = neural_memory(q, q, q, lr, None, None, w, architecture="linear", optimizer="gd", output_final_state=True)
    with pytest.raises(ValueError, match="initial_state/output_final_state are not supported"):
        neural_memory(
            q, q, q, lr, None, None, w, architecture="linear", optimizer="gd", initial_state=st, cu_seqlens=cu
        )
    _, kst = kernel_memory(
        q, q, q, lr, {}, torch.ones(NH, dtype=torch.float64), rule=KernelRule(depth=1), output_final_state=True
    )
    with pytest.raises(ValueError, match="initial_state/output_final_state are not supported"):
        kernel_memory(
            q,
            q,
            q,
            lr,
            {},
            torch.ones(NH, dtype=torch.float64),
            rule=KernelRule(depth=1),
            initial_state=kst,
            cu_seqlens=cu,
        )
    layer = Attention(16, 2, 8).double()
    x = _random((1, 9, 16), gen)
    _, ast = layer(x, return_state=True)
    with pytest.raises(ValueError, match="state/return_state are not supported"):
        layer(x, ast, cu_seqlens=cu)
