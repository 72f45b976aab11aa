import math

import pytest
import torch

from deepmemory.layers.feature_maps import (
    IdentityFeatureMap,
    PolynomialFeatureMap,
    make_feature_map,
    symmetric_monomials,
)


def _full_power(x, i):
    """x^{⊗i} by repeated outer products: [..., d^i]."""
    out = x
    for _ in range(i - 1):
        out = (out.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return out


@pytest.mark.parametrize("d,p", [(1, 3), (5, 1), (7, 2), (6, 3)])
def test_width_is_number_of_multisets(d, p):
    phi = PolynomialFeatureMap(d, p, num_heads=2)
    assert phi.out_dim == sum(math.comb(d + i - 1, i) for i in range(1, p + 1))
    assert phi(torch.randn(3, 2, d)).shape == (3, 2, phi.out_dim)


def test_init_coefficients_are_taylor():
    phi = PolynomialFeatureMap(4, 3, num_heads=3)
    want = torch.tensor([1.0, 1 / math.sqrt(2), 1 / math.sqrt(6)])
    torch.testing.assert_close(phi.coef.detach(), want.repeat(3, 1))


@pytest.mark.parametrize("d,p", [(5, 2), (4, 3), (3, 4)])
def test_inner_product_matches_full_tensor_power_kernel(d, p):
    torch.manual_seed(0)
    h = 3
    phi = PolynomialFeatureMap(d, p, num_heads=h).double()
    with torch.no_grad():
        phi.coef.copy_(torch.randn(h, p, dtype=torch.float64))
    x = torch.randn(2, 7, h, d, dtype=torch.float64)
    y = torch.randn(2, 7, h, d, dtype=torch.float64)
    got = (phi(x) * phi(y)).sum(-1)
    # independent: the full tensor power features a_i x^{⊗i}
    full_x = torch.cat([phi.coef[:, i - 1, None] * _full_power(x, i) for i in range(1, p + 1)], -1)
    full_y = torch.cat([phi.coef[:, i - 1, None] * _full_power(y, i) for i in range(1, p + 1)], -1)
    torch.testing.assert_close(got, (full_x * full_y).sum(-1), rtol=1e-12, atol=1e-12)
    dot = (x * y).sum(-1)
    closed = sum(phi.coef[:, i - 1] ** 2 * dot**i for i in range(1, p + 1))
    torch.testing.assert_close(got, closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi.kernel(x, y), closed, rtol=1e-12, atol=1e-12)


def test_monomial_weights_are_multinomial_roots():
    idx, w = symmetric_monomials(3, 3)
    table = {tuple(r.tolist()): float(v) for r, v in zip(idx, w)}
    assert table[(0, 0, 0)] == pytest.approx(1.0)
    assert table[(0, 0, 1)] == pytest.approx(math.sqrt(3))
    assert table[(0, 1, 2)] == pytest.approx(math.sqrt(6))


def test_coefficients_get_gradients_per_head():
    torch.manual_seed(1)
    phi = PolynomialFeatureMap(4, 2, num_heads=2).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    loss = phi(x)[:, 0].pow(2).sum()  # only head 0
    loss.backward()
    assert phi.coef.grad[0].abs().min() > 0
    assert torch.all(phi.coef.grad[1] == 0)


def test_identity_and_factory():
    x = torch.randn(2, 3, 4)
    assert make_feature_map("identity", 4, 3, 2)(x) is x
    assert make_feature_map("identity", 4, 3, 2).out_dim == 4
    assert isinstance(make_feature_map("polynomial", 4, 3, 2), PolynomialFeatureMap)
    assert IdentityFeatureMap(4).out_dim == 4


def test_errors():
    with pytest.raises(ValueError, match="feature_map"):
        make_feature_map("exp", 4, 2, 2)
    with pytest.raises(ValueError, match="degree"):
        PolynomialFeatureMap(4, 0, 2)
    with pytest.raises(TypeError, match="head_dim"):
        PolynomialFeatureMap(4.0, 2, 2)
    with pytest.raises(TypeError, match="num_heads"):
        PolynomialFeatureMap(4, 2, True)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 2, 4\]"):
        PolynomialFeatureMap(4, 2, 2)(torch.randn(3, 3, 4))


@pytest.mark.parametrize("d,p", [(5, 2), (3, 3)])
def test_degree_zero_term_completes_the_taylor_kernel(d, p):
    # ATLAS eq. 5 with its degree-0 term: <phi(x), phi(y)> = a_0^2 + sum_i a_i^2 <x, y>^i, which at
    # initialisation is the degree-p Taylor polynomial of exp(<x, y>)
    torch.manual_seed(2)
    h = 2
    phi = PolynomialFeatureMap(d, p, num_heads=h, constant=True).double()
    assert phi.out_dim == 1 + PolynomialFeatureMap(d, p, num_heads=h).out_dim
    x = torch.randn(4, h, d, dtype=torch.float64)
    y = torch.randn(4, h, d, dtype=torch.float64)
    dot = (x * y).sum(-1)
    taylor = sum(dot**i / math.factorial(i) for i in range(p + 1))
    # (the coefficients are initialised in float32)
    torch.testing.assert_close((phi(x) * phi(y)).sum(-1), taylor, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        phi.coef0.copy_(torch.tensor([0.5, -2.0], dtype=torch.float64))
    closed = phi.coef0**2 + sum(phi.coef[:, i - 1] ** 2 * dot**i for i in range(1, p + 1))
    torch.testing.assert_close((phi(x) * phi(y)).sum(-1), closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi.kernel(x, y), closed, rtol=1e-12, atol=1e-12)
    phi(x)[:, 1].sum().backward()
    assert phi.coef0.grad[1] != 0 and phi.coef0.grad[0] == 0
    with pytest.raises(TypeError, match="constant"):
        PolynomialFeatureMap(d, p, num_heads=h, constant=1)
