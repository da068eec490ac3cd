import math

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


@pytest.mark.parametrize("x", [2.0**60, -(2.0**60), 1e30, math.inf, -math.inf, math.nan])
def test_out_of_range_is_refused(x):
    with pytest.raises(FixedPointOverflow):
        codec.encode(x)


def test_value_bits_bound_every_encoding():
    assert abs(codec.encode(2.0**60 - 2.0**8)) < 2**codec.value_bits(32)
