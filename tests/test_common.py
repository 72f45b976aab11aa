import torch
import torch.nn.functional as F

from deepmemory.layers import RMSNorm, ShortConv, SwiGLU


def test_short_conv_is_a_causal_depthwise_conv():
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.conv.weight, groups=6)).transpose(1, 2)
    assert torch.allclose(conv(x), ref, atol=1e-13)


def test_short_conv_streams_exactly():
    for k in (1, 2, 4):
        conv = ShortConv(5, k).double()
        x = torch.randn(2, 13, 5, dtype=torch.float64)
        full = conv(x)
        outs, state = [], None
        for a, b in ((0, 1), (1, 6), (6, 7), (7, 13)):
            y, state = conv(x[:, a:b], state, return_state=True)
            outs.append(y)
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-13)


def test_rmsnorm_and_swiglu():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8).double()
    assert torch.allclose(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(), atol=1e-12)
    assert RMSNorm(8)(x.bfloat16()).dtype == torch.bfloat16
    mlp = SwiGLU(8, 12).double()
    g, u = (x @ mlp.gate_up.weight.T).chunk(2, -1)
    assert torch.allclose(mlp(x), (F.silu(g) * u) @ mlp.down.weight.T, atol=1e-12)
