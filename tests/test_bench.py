"""`swarm bench` end to end at its smallest scale: every figure is there and positive.
No timing is asserted: the machine running the tests decides those."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from swarm.bench import WORKLOADS, add_bench_arguments, dag, main_bench

EXPECTED = {
    "W1", "CPU", "W2", "W3", "W3_raw", "W3_ratio", "W4", "W4_p99",
    "W5_w1_200", "W5_w1_1000", "W5_flat", "W5_sim", "W5_sim_ratio",
    "W5_yaml_s", "W5_yaml_rss", "W5_toml_s", "W5_toml_rss", "W5_memory",
}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_dag_has_three_parents_from_the_previous_layer_and_is_seeded() -> None:
    wf = dag(3, 10)
    assert len(wf.symbols) == 30
    assert all(not s.dependencies for s in wf.symbols[:10])
    for s in wf.symbols[10:]:
        layer = int(s.name.split(".")[0][1:])
        assert len(set(s.dependencies)) == 3
        assert all(d.startswith(f"l{layer - 1}.") for d in s.dependencies)
    assert dag(3, 10) == wf


def test_only_rejects_an_unknown_workload() -> None:
    with pytest.raises(SystemExit):
        _args("--only", "W1,W9")
    assert _args("--only", "w2,W4").only == ["W2", "W4"]
    assert _args().only == list(WORKLOADS)


@pytest.mark.e2e
def test_small_bench_reports_every_workload_with_positive_figures(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main_bench(_args("--scale", "small", "--runs", "1", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    results = report["results"]
    assert set(results) == EXPECTED
    for key, row in results.items():
        for value in (row["median"], row["min"], row["max"], *row["samples"]):
            assert math.isfinite(value) and value > 0, (key, row)
    assert report["config"]["synchronous"] == "FULL"
    assert report["config"]["journal_mode"] == "wal"
    assert set(report["peers"]) == {"Dask", "Ray", "Celery"}
