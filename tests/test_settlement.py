from hypothesis import given, strategies as st

from deltaml.protocol.settlement import leave_one_out, settle

wei = st.integers(min_value=0, max_value=10**24)
owners = [f"owner-{i}" for i in range(1, 7)]


@given(fixed=wei, pool=wei, contributions=st.lists(st.integers(-10**9, 10**9), min_size=5, max_size=5),
       mse0=st.integers(1, 10**12), msef=st.integers(0, 2 * 10**12))
def test_payments_plus_refund_equal_the_deposit(fixed, pool, contributions, mse0, msef):
    trainers = owners[:5]
    s = settle(fixed_reward=fixed, variable_pool=pool, participants=owners,
               contributions_micro=dict(zip(trainers, contributions)), mse0_micro=mse0, mse_final_micro=msef)
    assert sum(s.payments.values()) + s.refund == s.deposit == fixed * len(owners) + pool
    assert s.refund >= 0 and all(p >= fixed for p in s.payments.values())
    for owner, c in zip(trainers, contributions):
        if c <= 0:
            assert s.payments[owner] == fixed  # no variable share for a harmful or useless owner
    assert s.payments[owners[5]] == fixed  # validators get the fixed reward only


def test_variable_pool_scales_with_improvement():
    args = dict(fixed_reward=0, variable_pool=1000, participants=["a", "b"], contributions_micro={"a": 3, "b": 1})
    half = settle(**args, mse0_micro=100, mse_final_micro=50)
    assert half.payments == {"a": 375, "b": 125} and half.refund == 500
    worse = settle(**args, mse0_micro=100, mse_final_micro=150)
    assert worse.payments == {"a": 0, "b": 0} and worse.refund == 1000


def test_leave_one_out_is_mse_without_minus_mse_with():
    assert leave_one_out(10.0, {"a": 12.5, "b": 9.0}) == {"a": 2.5, "b": -1.0}
