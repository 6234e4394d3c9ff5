"""The RTN quantizer against independent computations: by hand, a pure-Python reference, torchao."""

from __future__ import annotations

import math

import pytest
import torch

from relapse.attacks.rtn import QuantScheme, fake_quantize, parse_rtn_name, quantize
from relapse.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# A 2x4 matrix computed by hand.
#
# Row 0 mixes signs (its first group of two is all positive, so the asymmetric range's low end is
# clamped up to 0); row 1's second group is all negative (the high end is clamped down to 0). No value
# lies within 0.07 of a rounding boundary (w / scale = k + 0.5) on any of the grids below, so float32
# arithmetic cannot flip a code.
W = [[2.7, 1.1, -1.65, 2.05], [2.0, -1.2, -0.4, -2.8]]

# (bits, group_size, symmetric) -> scale[row][group], zero[row][group], codes[row][group][element].
# Asymmetric: lo = min(w_min, 0), hi = max(w_max, 0), scale = (hi - lo) / (2^b - 1),
#   zero = round(-lo / scale), code = clamp(round(w / scale) + zero, 0, 2^b - 1).
# Symmetric: scale = max|w| / (2^(b-1) - 1), code = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1).
HAND = {
    # 2 bits, per channel. Row 0: scale 4.35/3 = 1.45, -lo/scale = 1.14 -> zero 1;
    # w/scale = 1.86, 0.76, -1.14, 1.41 -> 2, 1, -1, 1 -> +1 -> 3, 2, 0, 2.
    # Row 1: scale 4.8/3 = 1.6, -lo/scale = 1.75 -> zero 2; w/scale = 1.25, -0.75, -0.25, -1.75
    # -> 1, -1, 0, -2 -> +2 -> 3, 1, 2, 0.
    (2, None, False): (
        [[(2.7 + 1.65) / 3], [(2.0 + 2.8) / 3]],
        [[1], [2]],
        [[[3, 2, 0, 2]], [[3, 1, 2, 0]]],
    ),
    # 2 bits symmetric: qmax = 1, scale = absmax; w/scale rounds to -1, 0 or 1.
    # Row 0: 1, 0.41, -0.61, 0.76 -> 1, 0, -1, 1. Row 1: 0.71, -0.43, -0.14, -1 -> 1, 0, 0, -1.
    (2, None, True): ([[2.7], [2.8]], [[0], [0]], [[[1, 0, -1, 1]], [[1, 0, 0, -1]]]),
    # 2 bits, groups of 2.
    # (2.7, 1.1): lo 0, scale 0.9, zero 0, w/scale 3, 1.22 -> 3, 1.
    # (-1.65, 2.05): scale 3.7/3, -lo/scale 1.34 -> zero 1, w/scale -1.34, 1.66 -> -1, 2 -> 0, 3.
    # (2.0, -1.2): scale 3.2/3, -lo/scale 1.125 -> zero 1, w/scale 1.875, -1.125 -> 2, -1 -> 3, 0.
    # (-0.4, -2.8): hi 0, scale 2.8/3, -lo/scale 3 -> zero 3, w/scale -0.43, -3 -> 0, -3 -> 3, 0.
    (2, 2, False): (
        [[2.7 / 3, (2.05 + 1.65) / 3], [(2.0 + 1.2) / 3, 2.8 / 3]],
        [[0, 1], [1, 3]],
        [[[3, 1], [0, 3]], [[3, 0], [3, 0]]],
    ),
    (2, 2, True): ([[2.7, 2.05], [2.0, 2.8]], [[0, 0], [0, 0]], [[[1, 0], [-1, 1]], [[1, -1], [0, -1]]]),
    # 4 bits, per channel. Row 0: scale 4.35/15 = 0.29, -lo/scale 5.69 -> zero 6;
    # w/scale 9.31, 3.79, -5.69, 7.07 -> 9, 4, -6, 7 -> 15, 10, 0, 13.
    # Row 1: scale 0.32, -lo/scale 8.75 -> zero 9; w/scale 6.25, -3.75, -1.25, -8.75 -> 6, -4, -1, -9
    # -> 15, 5, 8, 0.
    (4, None, False): (
        [[(2.7 + 1.65) / 15], [(2.0 + 2.8) / 15]],
        [[6], [9]],
        [[[15, 10, 0, 13]], [[15, 5, 8, 0]]],
    ),
    # 4 bits symmetric: qmax 7. Row 0: scale 2.7/7, w/scale 7, 2.85, -4.28, 5.31 -> 7, 3, -4, 5.
    # Row 1: scale 0.4, w/scale 5, -3, -1, -7.
    (4, None, True): ([[2.7 / 7], [2.8 / 7]], [[0], [0]], [[[7, 3, -4, 5]], [[5, -3, -1, -7]]]),
    # 4 bits, groups of 2.
    # (2.7, 1.1): scale 0.18, zero 0, 15, 6.11 -> 15, 6.
    # (-1.65, 2.05): scale 3.7/15, -lo/scale 6.69 -> zero 7, w/scale -6.69, 8.31 -> -7, 8 -> 0, 15.
    # (2.0, -1.2): scale 3.2/15, -lo/scale 5.625 -> zero 6, 9.375, -5.625 -> 9, -6 -> 15, 0.
    # (-0.4, -2.8): hi 0, scale 2.8/15, zero 15, w/scale -2.14, -15 -> -2, -15 -> 13, 0.
    (4, 2, False): (
        [[2.7 / 15, (2.05 + 1.65) / 15], [(2.0 + 1.2) / 15, 2.8 / 15]],
        [[0, 7], [6, 15]],
        [[[15, 6], [0, 15]], [[15, 0], [13, 0]]],
    ),
    # 4 bits symmetric, groups of 2: (2.7, 1.1) -> 7, 2.85 -> 3; (-1.65, 2.05) -> -5.63, 7 -> -6, 7;
    # (2.0, -1.2) -> 7, -4.2 -> -4; (-0.4, -2.8) -> -1, -7.
    (4, 2, True): (
        [[2.7 / 7, 2.05 / 7], [2.0 / 7, 2.8 / 7]],
        [[0, 0], [0, 0]],
        [[[7, 3], [-6, 7]], [[7, -4], [-1, -7]]],
    ),
}


def _flat(nested: list[list[float]]) -> list[float]:
    return [x for row in nested for x in row]


@pytest.mark.parametrize(("bits", "group", "symmetric"), list(HAND))
def test_hand_computed_example(bits, group, symmetric):
    scales, zeros, codes = HAND[(bits, group, symmetric)]
    scheme = QuantScheme(bits, group, symmetric)
    weight = torch.tensor(W, dtype=torch.float32)
    result = quantize(weight, scheme)
    size = group or 4
    assert result.codes.dtype == torch.int32
    assert result.codes.tolist() == codes
    assert result.zero.squeeze(-1).tolist() == zeros
    flat_scales = _flat(scales)
    assert result.scale.flatten().tolist() == pytest.approx(flat_scales, rel=1e-6)  # float32 vs float64
    expected = [
        [(codes[r][c // size][c % size] - zeros[r][c // size]) * scales[r][c // size] for c in range(4)]
        for r in range(2)
    ]
    fake = fake_quantize(weight, scheme)
    assert fake.shape == (2, 4)
    assert fake.flatten().tolist() == pytest.approx(_flat(expected), abs=1e-6)
    assert result.dequantize().flatten().tolist() == pytest.approx(_flat(expected), abs=1e-6)
    steps = [[scales[r][c // size] for c in range(4)] for r in range(2)]
    assert result.step().flatten().tolist() == pytest.approx(_flat(steps), rel=1e-6)
    # The table itself obeys the RTN guarantee: every hand-computed value is within half a step of w.
    for r in range(2):
        for c in range(4):
            assert abs(expected[r][c] - W[r][c]) <= steps[r][c] / 2 + 1e-9


def test_ties_round_half_to_even():
    # Asymmetric 2 bits on [0, 3]: scale exactly 1, zero 0, and w / scale is exactly 0.5, 1.5, 2.5.
    weight = torch.tensor([[0.5, 1.5, 2.5, 3.0]])
    result = quantize(weight, QuantScheme(2, None))
    assert result.scale.item() == 1.0
    assert result.codes.flatten().tolist() == [0, 2, 2, 3]
    assert fake_quantize(weight, QuantScheme(2, None)).tolist() == [[0.0, 2.0, 2.0, 3.0]]


# --------------------------------------------------------------------------------------------------
# A slow, pure-Python reference of both grids.


def _ref_group(values: list[float], bits: int, symmetric: bool) -> tuple[float, int, list[int]]:
    """Scale, zero and codes of one group, in float64 with Python's round (half to even)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = max(max(abs(v) for v in values) / qmax, 2.0**-23)
        return scale, 0, [min(max(round(v / scale), -qmax - 1), qmax) for v in values]
    qmax = 2**bits - 1
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    scale = max((hi - lo) / qmax, 2.0**-23)
    zero = min(max(round(-lo / scale), 0), qmax)
    return scale, zero, [min(max(round(v / scale) + zero, 0), qmax) for v in values]


def _near_tie(value: float, scale: float) -> bool:
    x = value / scale
    return abs(x - math.floor(x) - 0.5) < 1e-4


def _random_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes, one all-positive row, one all-negative row, a few exact 0s."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 1, rows).unsqueeze(1)
    w[0] = w[0].abs()
    w[1] = -w[1].abs()
    w[-1, :: cols // 4] = 0.0
    return w


SHAPES = [(3, 128), (4, 256), (2, 384)]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_pure_python_reference(bits, symmetric):
    checked = ties = 0
    for seed, (rows, cols) in enumerate(SHAPES):
        weight = _random_matrix(rows, cols, seed)
        values = weight.tolist()
        for group in (None, 32, 64, 128):
            scheme = QuantScheme(bits, group, symmetric)
            result = quantize(weight, scheme)
            fake = fake_quantize(weight, scheme).tolist()
            codes = result.codes.reshape(rows, cols).tolist()
            size = group or cols
            for r in range(rows):
                for g in range(cols // size):
                    chunk = values[r][g * size : (g + 1) * size]
                    scale, zero, ref_codes = _ref_group(chunk, bits, symmetric)
                    assert result.scale[r, g, 0].item() == pytest.approx(scale, rel=1e-6)
                    assert result.zero[r, g, 0].item() == zero
                    for i, (value, ref) in enumerate(zip(chunk, ref_codes, strict=True)):
                        c = g * size + i
                        checked += 1
                        if codes[r][c] != ref:
                            assert _near_tie(value, scale), (scheme.name, r, c, value, codes[r][c], ref)
                            assert abs(codes[r][c] - ref) == 1
                            ties += 1
                            continue
                        expected = (ref - zero) * scale
                        assert fake[r][c] == pytest.approx(expected, rel=1e-6, abs=1e-6 * scale)
    assert checked == 4 * sum(r * c for r, c in SHAPES)  # 4 groupings x all elements
    assert ties <= checked * 1e-3


# --------------------------------------------------------------------------------------------------
# Properties.

SCHEMES = [
    QuantScheme(bits, group, symmetric)
    for bits in (2, 3, 4, 8)
    for group in (None, 32, 128)
    for symmetric in (False, True)
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_error_is_at_most_half_a_step(scheme):
    weight = _random_matrix(6, 256, seed=11)
    result = quantize(weight, scheme)
    step = result.step()
    assert step.shape == weight.shape
    error = (weight - fake_quantize(weight, scheme)).abs()
    assert (error <= step / 2 * (1 + 1e-6)).all()
    # the bound is not vacuous: the largest error is a sizeable share of half a step
    assert float((error / step).max()) > 0.4


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_step_is_the_scale_of_each_elements_group(scheme):
    weight = _random_matrix(4, 256, seed=3)
    result = quantize(weight, scheme)
    size = scheme.group_size or 256
    step = result.step()
    for r, c in [(0, 0), (1, 31), (2, 32), (3, 255), (2, 128), (1, 200)]:
        assert step[r, c].item() == result.scale[r, c // size, 0].item()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_idempotent(scheme):
    weight = _random_matrix(5, 256, seed=5)
    first = quantize(weight, scheme)
    again = quantize(first.dequantize(), scheme)
    assert torch.equal(first.codes, again.codes)
    # equal within float32 rounding: the recomputed scale may differ in its last bit, and a value of up to
    # 2^b - 1 steps then moves by a few units in its last place
    atol = 1e-6 * float(first.scale.max())
    assert torch.allclose(again.dequantize(), first.dequantize(), rtol=4e-7, atol=atol)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_codes_lie_in_the_integer_range(scheme):
    weight = _random_matrix(6, 256, seed=9)
    codes = quantize(weight, scheme).codes
    if scheme.symmetric:
        low, high = -(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1
    else:
        low, high = 0, 2**scheme.bits - 1
    assert int(codes.min()) >= low and int(codes.max()) <= high
    # the range is used: both ends of the positive side are reached
    assert int(codes.max()) == high


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_zero_maps_to_zero(scheme):
    weight = _random_matrix(4, 256, seed=13)
    weight[2] += 0.5  # shift a row away from 0 so that the grid's zero point is not trivial
    weight[2, 7] = 0.0
    weight[3, 100] = 0.0
    fake = fake_quantize(weight, scheme)
    assert fake[2, 7].item() == 0.0
    assert fake[3, 100].item() == 0.0
    if not scheme.symmetric:
        result = quantize(weight, scheme)
        size = scheme.group_size or 256
        assert result.codes[2, 7 // size, 7 % size].item() == result.zero[2, 7 // size, 0].item()
        assert result.zero[2, 7 // size, 0].item() > 0  # the shifted row still contains negatives


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_rows_stay_zero(symmetric):
    weight = torch.zeros(2, 64)
    weight[1, 3] = 1.0
    fake = fake_quantize(weight, QuantScheme(4, 32, symmetric))
    assert torch.isfinite(fake).all()
    assert torch.equal(fake[0], torch.zeros(64))
    assert fake[1, 3].item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 128), QuantScheme(8, None, True)], ids=lambda s: s.name)
def test_dtype_and_shape_preserved(dtype, scheme):
    weight = _random_matrix(4, 256, seed=2).to(dtype)
    fake = fake_quantize(weight, scheme)
    assert fake.dtype == dtype
    assert fake.shape == weight.shape
    result = quantize(weight, scheme)
    assert result.shape == (4, 256)
    assert result.dequantize().shape == weight.shape
    # computed from the input's values: within half a step, plus the output dtype's own rounding
    step = result.step()
    unit = torch.finfo(dtype).eps
    bound = step / 2 * (1 + 1e-6) + weight.float().abs() * unit + step * unit
    assert ((fake.float() - weight.float()).abs() <= bound).all()
    assert not torch.equal(fake, weight)


# --------------------------------------------------------------------------------------------------
# Errors.


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(ConfigError) as info:
        quantize(torch.zeros(4, 100), QuantScheme(4, 64), where="model.layers.0.mlp.up_proj.weight")
    message = str(info.value)
    assert "100" in message and "64" in message
    assert "model.layers.0.mlp.up_proj.weight" in message
    with pytest.raises(ConfigError, match=r"my\.weight"):
        fake_quantize(torch.zeros(2, 96), QuantScheme(4, 64), where="my.weight")


@pytest.mark.parametrize("bits", [0, 1, 5, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ConfigError, match=str(bits)):
        QuantScheme(bits, 128)


@pytest.mark.parametrize("group", [0, -32])
def test_group_size_must_be_positive(group):
    with pytest.raises(ConfigError):
        QuantScheme(4, group)


@pytest.mark.parametrize("shape", [(256,), (2, 4, 64), ()])
def test_only_two_dimensional_weights(shape):
    with pytest.raises(ConfigError, match="2-D"):
        quantize(torch.ones(shape), QuantScheme(4, None), where="w")
    with pytest.raises(ConfigError):
        fake_quantize(torch.ones(shape), QuantScheme(4, None))


# --------------------------------------------------------------------------------------------------
# Names.


@pytest.mark.parametrize(
    ("name", "bits", "group", "symmetric"),
    [
        ("rtn-w4-g128", 4, 128, False),
        ("rtn-w4-g128-sym", 4, 128, True),
        ("rtn-w8-ch", 8, None, False),
        ("rtn-w8-ch-sym", 8, None, True),
        ("rtn-w3-g64", 3, 64, False),
        ("rtn-w2-g32", 2, 32, False),
        ("RTN-W4-G128-SYM", 4, 128, True),
        ("Rtn-W8-CH", 8, None, False),
    ],
)
def test_parse_rtn_name(name, bits, group, symmetric):
    scheme = parse_rtn_name(name)
    assert scheme == QuantScheme(bits, group, symmetric)
    assert scheme.name == name.lower()
    assert parse_rtn_name(scheme.name) == scheme


@pytest.mark.parametrize(
    "name",
    [
        "rtn-4-g128",
        "rtn-w4-x128",
        "rtn-w4-g128-foo",
        "rtn-w5-g128",
        "rtn-w4",
        "rtn-w4-g",
        "rtn-wx-g128",
        "rtn-w4-g0",
        "rtn-w4-g128-sym-sym",
        "gptq-w4-g128",
        "",
    ],
)
def test_bad_rtn_names(name):
    with pytest.raises(ConfigError):
        parse_rtn_name(name)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_scheme_name_round_trips(scheme):
    assert parse_rtn_name(scheme.name) == scheme


# --------------------------------------------------------------------------------------------------
# torchao's own primitives for the same grid.


def _torchao_fake_quantize(weight: torch.Tensor, block: int, quant_max: int):
    """torchao 0.18's asymmetric affine quantizer with an integer zero point (its only zero-point domain
    in ``quantize_affine``/``dequantize_affine``: q = clamp(round(w / scale) + zero, qmin, qmax)).

    ``choose_qparams_affine`` with ``MappingType.ASYMMETRIC`` takes the range [min(w_min, 0),
    max(w_max, 0)] (``preserve_zero``, now always on), ``scale = range / (qmax - qmin)`` and
    ``zero = qmin - round(min / scale)``: the grid relapse documents. Two documented differences:
    torchao clamps the scale at ``finfo.smallest_normal`` (relapse at ``finfo.eps``; they differ only for
    groups whose range is below ~1e-6, which random weights do not have) and it multiplies by
    ``1 / scale`` instead of dividing (which can move an element lying within float32 rounding of a
    rounding boundary into the neighbouring code; such elements are counted and excluded).
    """
    primitives = pytest.importorskip("torchao.quantization.quant_primitives")
    block_size = (1, block)
    scale, zero = primitives.choose_qparams_affine(
        weight, primitives.MappingType.ASYMMETRIC, block_size, torch.uint8, quant_min=0, quant_max=quant_max
    )
    codes = primitives.quantize_affine(weight, block_size, scale, zero, torch.uint8, 0, quant_max)
    fake = primitives.dequantize_affine(codes, block_size, scale, zero, torch.uint8, 0, quant_max)
    return scale, zero, codes, fake


@pytest.mark.parametrize(
    ("scheme", "quant_max"),
    [(QuantScheme(4, 128), 15), (QuantScheme(4, 32), 15), (QuantScheme(8, None), 255)],
    ids=["int4-g128", "int4-g32", "int8-ch"],
)
def test_matches_torchao(scheme, quant_max):
    pytest.importorskip("torchao")
    weight = _random_matrix(8, 256, seed=21)
    block = scheme.group_size or weight.shape[1]
    scale, zero, codes, fake = _torchao_fake_quantize(weight, block, quant_max)
    ours = quantize(weight, scheme)
    rows, groups = weight.shape[0], weight.shape[1] // block
    assert torch.equal(ours.scale.reshape(rows, groups), scale.reshape(rows, groups))
    assert torch.equal(ours.zero.reshape(rows, groups), zero.reshape(rows, groups).float())
    our_codes = ours.codes.reshape(weight.shape)
    differ = our_codes != codes.to(torch.int32)
    if differ.any():  # only at float32 rounding boundaries (see _torchao_fake_quantize)
        x = weight / ours.step()
        assert ((x - x.floor() - 0.5).abs()[differ] < 1e-5).all()
        assert int(differ.sum()) <= 2
    same = ~differ
    assert torch.equal(ours.dequantize()[same], fake[same])
    assert torch.equal(fake_quantize(weight, scheme)[same], fake[same])
