"""rankserve.quant: the symmetric int8 layout's math, against its definition."""

import pytest
import torch

from rankserve.quant import QMAX, check_int8, dequantize_int8, quantize_int8


@pytest.mark.parametrize("group", [None, 32, 64])
def test_roundtrip_error_within_half_a_step(group):
    torch.manual_seed(0)
    W = torch.randn(48, 128) * torch.logspace(-2, 1, 48).unsqueeze(1)  # rows of very different magnitude
    q, scale = quantize_int8(W, group)
    g = 128 if group is None else group
    assert q.dtype == torch.int8 and scale.shape == (48, 128 // g)
    assert int(q.abs().max()) <= QMAX
    err = (dequantize_int8(q, scale) - W).abs().reshape(48, 128 // g, g)
    # round to nearest: every element within half a quantization step of its group
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-7).all()
    # the largest element of each group is represented exactly (up to fp32 rounding)
    amax = W.reshape(48, 128 // g, g).abs().amax(-1)
    assert torch.allclose(scale * QMAX, amax, rtol=1e-6)


def test_zero_rows_and_bad_input():
    W = torch.zeros(4, 32)
    W[1] = torch.linspace(-1, 1, 32)
    q, scale = quantize_int8(W)
    assert scale[0, 0] == 0 and (q[0] == 0).all()
    assert torch.equal(dequantize_int8(q, scale)[0], torch.zeros(32))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int8(W, 5)
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="int8 scale"):
        check_int8(q, scale.double())
    with pytest.raises(ValueError, match="non-negative"):
        check_int8(q, -scale - 1)
