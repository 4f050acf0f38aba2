"""bench.timing: shared helpers of the benchmarks (here: where a smoke run writes)."""

import hashlib
import json

import pytest

from bench import timing


def test_a_smoke_run_without_output_writes_to_a_new_temporary_folder(tmp_path):
    first = timing.smoke_output("bench/results", explicit=False, quick=True, files=["latency.json"])
    second = timing.smoke_output("bench/results", explicit=False, quick=True, files=["latency.json"])
    assert first != second and first.is_dir() and first.name.startswith("rnp_bench_quick_")
    assert timing.smoke_output(tmp_path, explicit=False, quick=False, files=["x.json"]) == tmp_path


@pytest.mark.parametrize("content, refused", [
    ({"config": {"quick": False}}, True), ({"flags": {"quick": False}}, True), ({"rows": []}, True),
    ({"config": {"quick": True}}, False), ({"quick": True}, False),
])
def test_a_smoke_run_never_replaces_a_full_result(tmp_path, content, refused):
    (tmp_path / "latency.json").write_text(json.dumps(content))
    if refused:
        with pytest.raises(ValueError, match="holds a full run's latency.json"):
            timing.smoke_output(tmp_path, explicit=True, quick=True, files=["latency.json"])
    else:
        assert timing.smoke_output(tmp_path, explicit=True, quick=True, files=["latency.json"]) == tmp_path
    assert timing.smoke_output(tmp_path, explicit=True, quick=False, files=["latency.json"]) == tmp_path


def test_latency_smoke_run_refuses_a_folder_of_full_results(tmp_path, run_module):
    published = tmp_path / "latency.json"
    published.write_text(json.dumps({"config": {"quick": False}, "rows": [1]}))
    before = hashlib.sha256(published.read_bytes()).hexdigest()
    done = run_module("bench.latency", "--quick", f"--output={tmp_path}", timeout=300)
    assert done.returncode != 0
    assert "holds a full run's latency.json" in done.stderr
    assert hashlib.sha256(published.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json"]
