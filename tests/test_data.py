import numpy as np
import pytest

from deltaml.cli import main
from deltaml.data import DataError, demo_split, load_csv, load_diabetes, write_csv


def write(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, where", [
    ("", "empty file"),
    ("a,b\n", "no data rows"),
    ("only\n1\n", "row 1: need at least two columns"),
    ("a,b\n1,2\n3,\n", "row 3, column 2 (b): missing value"),
    ("a,b\n1,2\nx,4\n", "row 3, column 1 (a): not a number"),
    ("a,b\n1,nan\n", "row 2, column 2 (b): not a finite number"),
    ("a,b\n1,2,3\n", "row 2: 3 cells"),
    ("a,a\n1,2\n", "distinct"),
])
def test_bad_csv_is_refused_naming_file_row_and_column(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_csv(path)
    assert str(path) in str(info.value) and where in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_refuses_a_bad_csv_in_one_line(tmp_path, capsys):
    path = write(tmp_path, "a,b\n1,2\n3,oops\n")
    assert main(["demo", "--dataset", str(path), "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 3, column 2 (b)" in err[0] and str(path) in err[0]


def test_cli_refuses_data_whose_sums_outgrow_the_fixed_point_bound_in_one_line(tmp_path, capsys):
    # an owner would decline such a job (its X^T X cannot be encrypted in the room the job plans),
    # so the demo would wait for owners that never come: it says so before anything starts
    rows = "".join(f"{i * 1e9},{i * 2e9},{i}\n" for i in range(1, 13))
    path = write(tmp_path, "a,b,y\n" + rows)
    assert main(["demo", "--dataset", str(path), "--rounds", "1", "--owners", "3", "--bus", "memory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], err
    assert "owner-1 cannot take part: its X^T X reaches" in err[0] and "the columns need scaling" in err[0]


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    # "CSV UTF-8" from a spreadsheet starts with U+FEFF: read as text it named the first column
    # "\ufeffage", and no job asking for "age" ever matched that owner
    path = tmp_path / "d.csv"
    path.write_bytes("age,bmi,y\n1,2,3\n4,5,6\n".encode("utf-8-sig"))
    assert load_csv(path).features == ("age", "bmi")
    path.write_bytes("age,bmi,y\n1,2,3\n4,oops,6\n".encode("utf-8-sig"))  # the checked reader too
    with pytest.raises(DataError, match=r"row 3, column 2 \(bmi\)"):
        load_csv(path)


def test_a_file_that_is_not_utf8_is_refused_in_one_line_naming_the_row(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("age,bmi,y\n1,2,3\n4,5,6\n# café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"row 4: not UTF-8 text \(byte 0xe9\)"):
        load_csv(path)
    assert main(["demo", "--dataset", str(path), "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "not UTF-8" in err[0]


def test_cli_refuses_short_keys(capsys):
    assert main(["demo", "--key-bits", "1024"]) == 2
    assert "2048" in capsys.readouterr().err


def test_csv_round_trip_and_split(tmp_path):
    data = load_diabetes()
    path = tmp_path / "diabetes.csv"
    write_csv(data, path)
    back = load_csv(path)
    assert back.columns == data.columns and np.array_equal(back.X, data.X) and np.array_equal(back.y, data.y)
    parts = demo_split(data, 5)
    assert [len(p.y) for p in parts] == [89, 89, 88, 88, 88]
    assert sorted(np.concatenate([p.y for p in parts])) == sorted(data.y)


def test_a_million_rows_load_and_reduce_to_the_same_statistics(tmp_path):
    from deltaml.protocol.linear import sufficient_stats

    gen = np.random.default_rng(1)
    X = gen.normal(size=(1_000_000, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + gen.normal(size=1_000_000)
    path = tmp_path / "big.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="a,b,c,t", comments="", fmt="%.17g")
    data = load_csv(path)
    assert data.features == ("a", "b", "c") and data.target == "t" and data.X.shape == (1_000_000, 3)
    stats = sufficient_stats(data.X, data.y)
    assert stats.rows == 1_000_000 and np.allclose(stats.moment, sufficient_stats(X, y).moment)


def test_an_owners_statistics_are_those_of_its_columns_to_the_bit_without_copying_them_out():
    """The owner fills ``[1, X]`` from its table instead of first copying the job's columns out: the
    same matrix, so the same sums to the bit, whatever the order and choice of columns."""
    from deltaml.protocol.linear import columns_stats, sufficient_stats

    gen = np.random.default_rng(2)
    for rows, cols in ((5, 3), (88, 12), (200_000, 21)):
        table = gen.normal(size=(rows, cols)) * gen.uniform(0.1, 100.0, size=cols)
        features, target = list(range(cols - 2, 0, -1)), 0  # reversed, one column left out, the target first
        want = sufficient_stats(table[:, features], table[:, target])
        got = columns_stats(table, features, target)
        assert np.array_equal(got.gram, want.gram) and np.array_equal(got.moment, want.moment)
        assert (got.sq, got.rows) == (want.sq, want.rows)


def test_an_owner_reduces_its_rows_once_for_a_jobs_offer_and_its_role(keypair, monkeypatch):
    from deltaml.protocol import messages as m
    from deltaml.protocol import owner

    passes = []
    real = owner.columns_stats
    monkeypatch.setattr(owner, "columns_stats", lambda *a: passes.append(a) or real(*a))
    data = owner.OwnerData(("a", "b", "t"), np.arange(12.0).reshape(4, 3))
    spec = m.JobSpec(buyer="b", features=["a", "b"], target="t", owners=2, validators=1, rounds=1,
                     lr=1.0, eval_every=1, key_bits=2048, public_key=keypair[0].to_hex())
    assert data.mismatch(spec) == ""  # the offer
    stats, _ = data.reduce(spec)  # the role: the same pass
    assert len(passes) == 1 and stats.dim == 3 and stats.rows == 4
    assert data.reduce(spec.model_copy(update={"features": ["b"]}))[0].dim == 2 and len(passes) == 2
    for bits in range(20, 20 + 2 * owner.KEPT_REDUCTIONS):  # another bound is another answer; a few are kept
        data.reduce(spec.model_copy(update={"magnitude_bits": bits}))
    assert len(data.reduced) == owner.KEPT_REDUCTIONS


def test_a_mistake_deep_in_a_large_file_is_still_named(tmp_path):
    rows = "\n".join(f"{i},{2 * i}" for i in range(50_000))
    path = write(tmp_path, f"a,b\n{rows}\n7,inf\n")
    with pytest.raises(DataError, match="row 50002, column 2 \\(b\\): not a finite number"):
        load_csv(path)


def test_an_owner_whose_columns_differ_from_the_job_says_why_it_does_not_join(keypair):
    from deltaml.protocol import messages as m
    from deltaml.protocol.owner import OwnerData

    data = OwnerData(("age", "bmi", "target"), np.ones((3, 3)))
    spec = m.JobSpec(buyer="b", features=["age", "bp"], target="target", owners=2, validators=1, rounds=1,
                     lr=1.0, eval_every=1, key_bits=2048, public_key=keypair[0].to_hex())
    assert data.reduce(spec) == (None, "the data lacks columns ['bp']")
    assert data.mismatch(spec) == "the data lacks columns ['bp']"
    spec = spec.model_copy(update={"features": ["age", "bmi"], "ranges": [(0.0, 0.5), (0.0, 2.0)]})
    assert data.mismatch(spec) == "column age has values outside the job's range [0.0, 0.5]"
    spec = spec.model_copy(update={"ranges": None, "magnitude_bits": 16})
    assert data.reduce(spec)[0] is not None  # 3 rows of ones: every sum is 3
    big = OwnerData(("age", "bmi", "target"), np.full((3, 3), 200.0))  # X^T X reaches 3 * 200**2 > 2**16
    assert big.mismatch(spec) == ("its X^T X reaches 1.2e+05, beyond the job's bound 2**16 (6.55e+04): "
                                  "the columns need scaling")
    targets = OwnerData(("age", "bmi", "target"), np.array([[0.1, 0.1, 200.0]] * 3))
    assert targets.mismatch(spec).startswith("its y^T y reaches 1.2e+05")


def test_diabetes_is_read_bit_for_bit_as_scikit_learn_scales_it():
    from sklearn.datasets import load_diabetes as sklearn_diabetes

    ours, theirs = load_diabetes(), sklearn_diabetes()
    assert ours.features == tuple(theirs.feature_names)
    assert np.array_equal(ours.X, theirs.data) and np.array_equal(ours.y, theirs.target)
