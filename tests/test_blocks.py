import math

import pytest
import torch
import torch.nn.functional as F

from deepmemory.layers import NeuralMemory
from deepmemory.layers.attention import AttentionState
from deepmemory.layers.blocks import MACBlock, MAGBlock, MALBlock, MemoryBlock, TransformerBlock
from deepmemory.layers.kernel_memory import KernelMemory

HID, NH, HD = 32, 2, 16
MEM = dict(chunk_size=4)
ATLAS = dict(
    chunk_size=4, window=3, optimizer="muon", architecture="gated_mlp", feature_map="polynomial", granularity="chunk"
)

BUILDERS = {
    "transformer": lambda: TransformerBlock(HID, NH, HD),
    "swa": lambda: TransformerBlock(HID, NH, HD, window=5, num_persistent=2),
    "lmm": lambda: MemoryBlock(NeuralMemory(HID, NH, HD, **MEM)),
    "gated_deltanet": lambda: MemoryBlock(
        NeuralMemory(
            HID, NH, HD, architecture="linear", residual=False, optimizer="gd", loss="l2", window=1, chunk_size=4
        )
    ),
    "lmm_persistent": lambda: MemoryBlock(NeuralMemory(HID, NH, HD, **MEM), num_persistent=3),
    "swdt": lambda: MemoryBlock(KernelMemory(HID, NH, HD, window=5, loss="dot", chunk_size=4)),
    "mag": lambda: MAGBlock(HID, NH, HD, window=5, num_persistent=3, memory_kwargs=MEM),
    "mal": lambda: MALBlock(HID, NH, HD, window=5, num_persistent=3, memory_kwargs=MEM),
    "mac": lambda: MACBlock(HID, NH, HD, segment_size=6, num_persistent=3, memory_kwargs=MEM),
    "mac_atlas": lambda: MACBlock(HID, NH, HD, segment_size=7, num_persistent=2, memory_kwargs=ATLAS),
    "mag_no_persistent": lambda: MAGBlock(HID, NH, HD, window=4, num_persistent=0, memory_kwargs=MEM),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    block = BUILDERS[name]().double()
    with torch.no_grad():  # persistent tokens large enough that using them shows
        for n, p in block.named_parameters():
            if n.endswith("persistent"):
                p.normal_()
    return block


def data(seq, bsz=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, seq, HID, generator=g, dtype=torch.float64)


def run_pieces(block, x, cuts):
    outs, state, prev = [], None, 0
    for c in list(cuts) + [x.shape[1]]:
        y, state = block(x[:, prev:c], state, return_state=True)
        state = state.detach()
        outs.append(y)
        prev = c
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_backward_finite(name):
    block, x = make(name), data(23)
    x.requires_grad_(True)
    y = block(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for n, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pieces_equal_one_pass(name):
    block, x = make(name), data(29)
    full = block(x)
    # cuts inside segments (6, 7) and windows (5), at and next to boundaries
    y, state = run_pieces(block, x, [4, 5, 6, 13, 20, 21])
    torch.testing.assert_close(y, full, rtol=0, atol=1e-10)
    assert getattr(state, "pos", 29) == 29


@pytest.mark.parametrize("name", ["swa", "lmm", "mag", "mal", "mac", pytest.param("mac_atlas", marks=pytest.mark.long)])
def test_token_by_token_equals_one_pass(name):
    block, x = make(name), data(17, bsz=1)
    y, state = run_pieces(block, x, range(1, 17))
    torch.testing.assert_close(y, block(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "mac_atlas"])
def test_no_future_leak(name):
    block, x = make(name), data(19)
    y = block(x)
    for t in (0, 6, 16):  # the first token of a segment (C = 6), and inside one
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
        y2 = block(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["swa", "mag", "mal", "mac"])
def test_persistent_tokens_used_not_positions(name):
    block, x = make(name), data(19)
    y, state = block(x, return_state=True)
    assert state.pos == 19
    attn_state = state if isinstance(state, AttentionState) else getattr(state, "attn", None)
    if attn_state is not None:  # the cache holds user tokens only
        assert attn_state.k.shape[2] == min(19, block.attn.window - 1)
    p = block.attn.persistent if block.attn.persistent is not None else block.persistent
    with torch.no_grad():
        p.mul_(-2.0)
    assert (block(x) - y).abs().max() > 1e-4


def naive_attention(attn, queries, keys, persistent):
    """``queries``: [(x_t [B, hidden], pos_t)]; ``keys``: per query, [(token [B, hidden], pos)];
    persistent tokens ``[N, hidden]`` scored against the un-rotated query."""
    half = HD // 2
    freq = attn.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)

    def rot(v, pos):  # v [B, H, D]
        z = torch.complex(v[..., :half], v[..., half:]) * torch.polar(torch.ones(half, dtype=torch.float64), pos * freq)
        return torch.cat([z.real, z.imag], -1)

    def heads(lin, t):
        return lin(t).view(t.shape[0], NH, HD)

    outs = []
    for (xq, tq), visible in zip(queries, keys):
        q = heads(attn.q_proj, xq)
        scores, values = [], []
        for pt in persistent:
            scores.append((q * heads(attn.k_proj, pt.expand_as(xq))).sum(-1))
            values.append(heads(attn.v_proj, pt.expand_as(xq)))
        for tok, tk in visible:
            scores.append((rot(q, tq) * rot(heads(attn.k_proj, tok), tk)).sum(-1))
            values.append(heads(attn.v_proj, tok))
        w = torch.softmax(torch.stack(scores, -1) / math.sqrt(HD), -1)  # [B, H, S]
        outs.append(attn.o_proj((w[..., None] * torch.stack(values, 2)).sum(2).flatten(1)))
    return torch.stack(outs, 1)


def test_mac_matches_naive():
    block, x = make("mac"), data(17)
    c, npers = block.segment_size, block.attn.num_persistent
    h = block.mixer_norm(x)
    mem_state, outs = None, []
    for s0 in range(0, 17, c):
        seg = h[:, s0 : s0 + c]
        q = F.normalize(block.retrieve_q(seg).view(2, -1, NH, HD), dim=-1)
        retrieved = block.retrieve_o(block.memory.read(q, mem_state).flatten(2))
        queries = [(seg[:, j], s0 + j) for j in range(seg.shape[1])]
        keys = [
            [(retrieved[:, i], s0 + i) for i in range(j + 1)] + [(seg[:, i], s0 + i) for i in range(j + 1)]
            for j in range(seg.shape[1])
        ]
        y = naive_attention(block.attn, queries, keys, block.attn.persistent)
        m, mem_state = block.memory(y, mem_state, return_state=True)
        outs.append(block.attn_out_norm(y) * torch.sigmoid(block.memory_out_norm(m)))
    ref = x + torch.cat(outs, 1)
    ref = ref + block.mlp(block.mlp_norm(ref))
    assert npers == 3
    torch.testing.assert_close(block(x), ref, rtol=0, atol=1e-10)


def test_mag_matches_naive():
    block, x = make("mag"), data(13)
    w, p = block.attn.window, block.attn.persistent
    h = block.mixer_norm(x)
    y = naive_attention(
        block.attn,
        [(h[:, t], t) for t in range(13)],
        [[(h[:, s], s) for s in range(max(0, t - w + 1), t + 1)] for t in range(13)],
        p,
    )
    m = block.memory(torch.cat([p.expand(2, -1, -1), h], 1))[:, p.shape[0] :]
    ref = x + block.attn_out_norm(y) * torch.sigmoid(block.memory_out_norm(m))
    ref = ref + block.mlp(block.mlp_norm(ref))
    torch.testing.assert_close(block(x), ref, rtol=0, atol=1e-10)


def test_lmm_persistent_tokens_are_read_before_the_sequence():
    block, x = make("lmm_persistent"), data(13)
    p, n_p = block.persistent, block.num_persistent
    # the memory reads P token by token (the op's reference loop), then the sequence
    mixer = block.mixer
    mixer.impl = "reference"
    m = mixer(torch.cat([p.expand(2, -1, -1), block.mixer_norm(x)], 1))[:, n_p:]
    mixer.impl = "chunk"
    ref = x + m
    ref = ref + block.mlp(block.mlp_norm(ref))
    torch.testing.assert_close(block(x), ref, rtol=0, atol=1e-10)
    with torch.no_grad():
        p.add_(1.0)
    assert (block(x) - ref).abs().max() > 1e-6  # P is read


def test_mal_matches_naive():
    block, x = make("mal"), data(13)
    w, n_p = block.attn.window, block.persistent.shape[0]
    m = block.memory(torch.cat([block.persistent.expand(2, -1, -1), block.mixer_norm(x)], 1))
    y = m[:, n_p:]
    o = naive_attention(
        block.attn,
        [(y[:, t], t) for t in range(13)],
        [[(y[:, s], s) for s in range(max(0, t - w + 1), t + 1)] for t in range(13)],
        [m[:1, i] for i in range(n_p)],
    )
    ref = x + o
    ref = ref + block.mlp(block.mlp_norm(ref))
    torch.testing.assert_close(block(x), ref, rtol=0, atol=1e-10)


def test_mac_reads_memory_before_segment():
    block, x = make("mac"), data(14)
    y = block(x)
    with torch.no_grad():  # the first segment's retrievals read the initial memory
        for w in block.memory.initial_weights.values():
            w.mul_(1.5)
    y2 = block(x)
    assert (y2[:, :6] - y[:, :6]).abs().max() > 1e-6


def test_mlp_width_and_defaults():
    b = TransformerBlock(HID, NH, HD)
    assert b.mlp.down.in_features == 96  # 2/3 * 4 * 32 = 85.3 -> 96
    assert TransformerBlock(HID, NH, HD, 50).mlp.down.in_features == 50
    mac, mag = MACBlock(HID, NH, HD), MAGBlock(HID, NH, HD)
    assert mac.segment_size == 512 and mac.attn.num_persistent == 16
    assert mag.attn.window == 2048 and mag.attn.num_persistent == 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_persistent"):
        MAGBlock(HID, NH, HD, num_persistent=-1)
    with pytest.raises(ValueError, match="segment_size"):
        MACBlock(HID, NH, HD, segment_size=0)
    with pytest.raises(ValueError, match="window"):
        MALBlock(HID, NH, HD, window=0)
    with pytest.raises(ValueError, match="window"):
        TransformerBlock(HID, NH, HD, window=0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        TransformerBlock(HID, NH, HD, mlp_ratio=0)
    with pytest.raises(ValueError, match="eps"):
        TransformerBlock(HID, NH, HD, eps=0.0)
    with pytest.raises(TypeError, match="memory_kwargs"):
        MAGBlock(HID, NH, HD, memory_kwargs="mlp")
    with pytest.raises(ValueError, match="architecture"):
        MACBlock(HID, NH, HD, memory_kwargs=dict(architecture="conv"))
    with pytest.raises(TypeError, match="mixer"):
        MemoryBlock(lambda x: x, HID)
    with pytest.raises(ValueError, match="hidden_size"):
        MemoryBlock(torch.nn.Identity())
    block = MACBlock(HID, NH, HD, segment_size=4, num_persistent=1, memory_kwargs=MEM)
    with pytest.raises(ValueError, match="x must be"):
        block(torch.randn(2, 5, HID + 1))
    with pytest.raises(TypeError, match="MACState"):
        block(torch.randn(2, 5, HID), state=AttentionState(torch.zeros(1), torch.zeros(1), 0))
