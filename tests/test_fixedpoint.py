import math
from fractions import Fraction

import pytest
from hypothesis import given, strategies as st

from deltaml.protocol.errors import FixedPointOverflow
from deltaml.protocol.fixedpoint import FixedPoint

codec = FixedPoint(frac_bits=32, magnitude_bits=60)


@given(st.floats(min_value=-2.0**59, max_value=2.0**59, allow_nan=False))
def test_round_trip_within_half_unit(x):
    assert abs(codec.decode(codec.encode(x)) - x) <= 2.0**-33


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), st.integers(min_value=32, max_value=1500))
def test_large_scales_are_exact(x, scale):
    v = codec.encode(x, scale)
    assert abs(codec.decode(v, scale) - x) <= max(abs(x) * 2**-52, 2.0**-scale)


@given(st.one_of(st.floats(min_value=-2.0**59, max_value=2.0**59, allow_nan=False),
                 st.integers(-(2**40), 2**40).map(lambda k: k + 0.5),  # ties at scale 0
                 st.integers(-(2**52), 2**52).map(lambda k: k * 2.0**-40)),  # ties at scales below 40
       st.integers(min_value=0, max_value=1200))
def test_encoding_rounds_the_exact_value_half_to_even(x, scale):
    """Below ``2**1023`` the product is a float, computed exactly; above, fractions: either way
    the integer is the exact ``x * 2**scale`` rounded half to even."""
    assert codec.encode(x, scale) == round(Fraction(x) * 2**scale)


def test_an_integer_beyond_a_floats_precision_is_encoded_exactly():
    assert codec.encode(2**55 + 1, 3) == (2**55 + 1) * 8


@pytest.mark.parametrize("x", [2.0**60, -(2.0**60), 1e30, math.inf, -math.inf, math.nan])
def test_out_of_range_is_refused(x):
    with pytest.raises(FixedPointOverflow):
        codec.encode(x)


def test_value_bits_bound_every_encoding():
    assert abs(codec.encode(2.0**60 - 2.0**8)) < 2**codec.value_bits(32)
