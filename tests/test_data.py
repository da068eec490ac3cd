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
