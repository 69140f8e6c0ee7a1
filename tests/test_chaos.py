"""hiermem bench --suite chaos, short: training SIGKILLed at random instants, inside checkpoints and the bank's
write-back, resumed until done: bitwise the uninterrupted run (and a changed run is caught)."""

import json

import pytest

from hiermem.bench.chaos import compare, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_killed_and_resumed_runs_equal_the_uninterrupted_ones(tmp_path, capsys):
    report = run(out=str(tmp_path), quick=True, seed=0)
    assert report["passed"], json.dumps(report["modes"], indent=1)
    for mode in ("anchor", "memory"):
        m = report["modes"][mode]
        assert m["kills"] >= 3 and m["inside_checkpoint"] >= 1 and m["armed"] >= 1, (mode, m)
    assert json.loads((tmp_path / "chaos.json").read_text())["passed"]
    assert "chaos: PASS" in capsys.readouterr().out

    work = tmp_path / "chaos"  # the comparison sees a duplicated step and a changed loss
    metrics = work / "memory-0" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:3] + lines[2:]))
    assert compare(work / "memory-0", work / "memory-reference")[0].startswith("metrics steps [1, 2, 3, 3, 4")
    rec = json.loads(lines[4])
    rec["loss"] = rec["loss"] + 1e-7
    metrics.write_text("".join(lines[:4] + [json.dumps(rec) + "\n"] + lines[5:]))
    assert compare(work / "memory-0", work / "memory-reference") == ["metrics differ from step 5"]
