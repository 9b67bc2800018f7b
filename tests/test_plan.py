"""The DAG of a workflow: cycles, levels, ranks and the critical path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarm.manifest import load_manifest
from swarm.model import Symbol, Workflow
from swarm.plan import Plan, analyze, find_cycle, find_cycles

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def workflow(spec: str, **dispatch: str) -> Workflow:
    """``"a; b<a; c<a,b"``: symbols in manifest order, each with its dependencies."""
    symbols = []
    for part in spec.split(";"):
        name, _, deps = part.strip().partition("<")
        name = name.strip()
        symbols.append(
            Symbol(
                name=name,
                type="action",
                dispatch=dispatch.get(name, "internal"),
                dependencies=tuple(d.strip() for d in deps.split(",") if d.strip()),
            )
        )
    return Workflow(name="wf", version="1", symbols=tuple(symbols))


DIAMOND = "a; b<a; c<a; d<b,c"


# -- find_cycle ----------------------------------------------------------------------------


def test_a_self_loop_is_a_cycle() -> None:
    assert find_cycle({"a": ["a"]}) == ["a", "a"]


def test_a_three_cycle_is_returned_as_a_closed_path() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def test_an_acyclic_graph_has_no_cycle() -> None:
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"], "d": ["b", "c"]}) is None
    assert find_cycle({}) is None


def test_names_outside_the_mapping_are_leaves() -> None:
    assert find_cycle({"a": ["ghost"], "b": ["a", "ghost"]}) is None


def test_the_cycle_found_is_a_shortest_one_through_the_first_symbol() -> None:
    deps = {"a": ["b", "x"], "b": ["c"], "c": ["a"], "x": ["a"]}
    assert find_cycle(deps) == ["a", "x", "a"]


def test_one_cycle_is_found_per_strongly_connected_component() -> None:
    deps = {"p": ["q"], "q": ["p"], "m": ["p"], "r": ["s", "m"], "s": ["r"], "t": ["t"]}
    assert find_cycles(deps) == [["p", "q", "p"], ["r", "s", "r"], ["t", "t"]]


def test_a_long_chain_needs_no_recursion() -> None:
    n = 100_000
    chain = {f"s{i}": [f"s{i - 1}"] if i else [] for i in range(n)}
    assert find_cycle(chain) is None
    chain["s0"] = [f"s{n - 1}"]  # close it: the cycle is the whole chain
    cycle = find_cycle(chain)
    assert cycle is not None and len(cycle) == n + 1 and cycle[0] == cycle[-1] == "s0"


# -- analyze -------------------------------------------------------------------------------


def test_diamond_levels_ranks_and_critical_path() -> None:
    plan = analyze(workflow(DIAMOND))
    assert plan.levels == (("a",), ("b", "c"), ("d",))
    assert plan.rank == {"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}
    assert plan.critical_path == ("a", "b", "d")  # ties go to manifest order
    assert (plan.critical_length, plan.total_work) == (3.0, 4.0)
    assert plan.dependents == {"a": ("b", "c"), "b": ("d",), "c": ("d",), "d": ()}


def test_durations_weight_ranks_and_choose_the_critical_path() -> None:
    plan = analyze(workflow(DIAMOND), {"a": 10, "b": 5, "c": 50, "d": 1})
    assert plan.rank == {"a": 61.0, "b": 6.0, "c": 51.0, "d": 1.0}
    assert plan.critical_path == ("a", "c", "d")
    assert (plan.critical_length, plan.total_work) == (61.0, 66.0)


def test_a_symbol_missing_from_durations_counts_one() -> None:
    plan = analyze(workflow("a; b<a"), {"b": 4.5})
    assert plan.rank == {"a": 5.5, "b": 4.5} and plan.total_work == 5.5


def test_negative_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="'a'"):
        analyze(workflow("a"), {"a": -1})


def test_chain_has_one_symbol_per_level() -> None:
    plan = analyze(workflow("c; b<c; a<b"))
    assert plan.order == ("c", "b", "a")
    assert plan.levels == (("c",), ("b",), ("a",))
    assert plan.critical_path == ("c", "b", "a") and plan.max_width == 1


def test_fan_out_puts_every_leaf_in_one_level() -> None:
    plan = analyze(workflow("root; x<root; y<root; z<root"))
    assert plan.levels == (("root",), ("x", "y", "z"))
    assert plan.max_width == 3 and plan.critical_path == ("root", "x")
    assert plan.rank["root"] == 2.0


def test_level_is_one_more_than_the_deepest_dependency() -> None:
    plan = analyze(workflow("a; b<a; c<b; d<a,c; e"))
    assert plan.levels == (("a", "e"), ("b",), ("c",), ("d",))


def test_order_is_topological_and_otherwise_in_manifest_order() -> None:
    plan = analyze(workflow("late<early2; early1; early2; mid<early1"))
    assert plan.order == ("early1", "early2", "late", "mid")


def test_critical_path_starts_at_the_heaviest_independent_symbol() -> None:
    plan = analyze(workflow("a; b; c<b"))
    assert plan.critical_path == ("b", "c") and plan.critical_length == 2.0


def test_by_backend_counts_dispatch_values_in_dispatch_order() -> None:
    plan = analyze(load_manifest(EXAMPLES / "example-workflow.yaml"))
    assert list(plan.by_backend.items()) == [("rust_injector", 1), ("php_engine", 2)]
    toml_plan = analyze(load_manifest(EXAMPLES / "example-workflow.toml"))
    assert toml_plan.by_backend == {"rust_injector": 1, "php_engine": 1}


def test_by_backend_lists_only_backends_in_use() -> None:
    plan = analyze(workflow("a; b; c", b="powershell_engine"))
    assert list(plan.by_backend.items()) == [("powershell_engine", 1), ("internal", 2)]


def test_to_dict_is_json_with_the_summary() -> None:
    plan = analyze(workflow(DIAMOND, d="php_engine"))
    assert json.loads(json.dumps(plan.to_dict())) == {
        "symbols": 4,
        "levels": [["a"], ["b", "c"], ["d"]],
        "max_width": 2,
        "critical_path": ["a", "b", "d"],
        "critical_length": 3.0,
        "total_work": 4.0,
        "by_backend": {"php_engine": 1, "internal": 3},
    }


def test_an_empty_workflow_has_an_empty_plan() -> None:
    plan = analyze(Workflow(name="wf", version="1", symbols=()))
    assert plan == Plan((), (), {}, (), 0.0, 0.0, {}, {})
    assert plan.to_dict()["max_width"] == 0


def test_a_cycle_is_refused_rather_than_planned() -> None:
    with pytest.raises(ValueError, match="cycle"):
        analyze(workflow("a<b; b<a"))


def test_a_100000_symbol_chain_is_planned_without_recursion() -> None:
    n = 100_000
    symbols = tuple(
        Symbol(name=f"s{i}", type="action", dependencies=(f"s{i - 1}",) if i else ())
        for i in range(n)
    )
    plan = analyze(Workflow(name="wf", version="1", symbols=symbols))
    assert len(plan.levels) == n and plan.max_width == 1
    assert plan.critical_length == n and plan.critical_path[-1] == f"s{n - 1}"
    assert plan.rank["s0"] == n and plan.order[:2] == ("s0", "s1")
