"""Manifests: what loads, and how every problem is reported (DESIGN §3)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm import manifest
from swarm.errors import InputError, ManifestError, Problem
from swarm.manifest import load_manifest, parse_manifest, workflow_from_dict
from swarm.model import RetryPolicy, RollbackSpec, Symbol, Workflow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FIXTURES = Path(__file__).resolve().parent / "manifests"
SOURCE = "wf.json"


def document(*symbols: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A valid manifest document around the given symbols (default: one noop)."""
    doc: dict[str, Any] = {"name": "wf", "version": "1.0.0"}
    doc["symbols"] = list(symbols) or [{"name": "a", "type": "action"}]
    doc.update(top)
    return doc


def problems(doc: object) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        workflow_from_dict(doc, SOURCE)
    return info.value.problems


def problem(doc: object) -> Problem:
    """The one problem of `doc`; fails if there are more or none."""
    found = problems(doc)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def yaml_problems(text: str, source: str = "wf.yaml") -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(textwrap.dedent(text), source, "yaml")
    return info.value.problems


def assert_at(p: Problem, symbol: str | None, field: str | None, *words: str) -> None:
    assert (p.file, p.symbol, p.field) == (SOURCE, symbol, field), str(p)
    for word in words:
        assert word in p.message, str(p)


# -- the original examples ---------------------------------------------------------------


def test_original_yaml_example_loads_unchanged() -> None:
    w = load_manifest(EXAMPLES / "example-workflow.yaml")
    assert (w.name, w.version, w.description) == (
        "example-workflow",
        "1.0.0",
        "Example symbolic workflow",
    )
    assert [s.name for s in w.symbols] == ["initialize", "process_data", "finalize"]
    init, process, final = w.symbols
    assert (init.type, init.context, init.dispatch, init.priority) == (
        "action",
        "wordpress",
        "php_engine",
        10,
    )
    assert init.parameters == {"operation": "init"}
    assert process.dependencies == ("initialize",)
    assert process.parameters == {"table": "wp_posts", "filter": "status = 'publish'"}
    assert final.rollback == RollbackSpec(
        name="rollback_finalize",
        type="action",
        context="wordpress",
        dispatch="php_engine",
        parameters={"operation": "restore"},
    )
    assert w.source == str(EXAMPLES / "example-workflow.yaml")


def test_original_toml_example_loads_unchanged() -> None:
    w = load_manifest(EXAMPLES / "example-workflow.toml")
    assert [(s.name, s.dispatch, s.dependencies) for s in w.symbols] == [
        ("initialize", "php_engine", ()),
        ("process_data", "rust_injector", ("initialize",)),
    ]
    assert w.symbols[1].parameters == {"table": "wp_posts", "filter": "status = 'publish'"}


@pytest.mark.parametrize("name", ["example-workflow.yaml", "example-workflow.toml"])
def test_examples_are_the_original_files(name: str) -> None:
    original = Path("/work/shared/original-examples") / name
    if not original.exists():
        pytest.skip("the original examples are not on this machine")
    assert (EXAMPLES / name).read_bytes() == original.read_bytes()


def test_the_same_workflow_in_yaml_toml_and_json_is_equal(tmp_path: Path) -> None:
    yaml_w = load_manifest(EXAMPLES / "example-workflow.yaml")
    (tmp_path / "w.json").write_text(json.dumps(yaml_w.to_dict()))
    (tmp_path / "w.yml").write_text(yaml.safe_dump(yaml_w.to_dict()))
    for copy_ in (load_manifest(tmp_path / "w.json"), load_manifest(tmp_path / "w.yml")):
        assert copy_.content_hash == yaml_w.content_hash


# -- reading files -----------------------------------------------------------------------


def test_unknown_extension_is_a_problem_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wf.ini"
    path.write_text("name = x")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (p,) = info.value.problems
    assert p.file == str(path) and "'.ini'" in p.message and ".yaml" in p.message


def test_missing_file_is_a_problem_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "absent.yaml")
    (p,) = info.value.problems
    assert p.file == str(tmp_path / "absent.yaml") and "cannot read" in p.message


def test_non_utf8_bytes_are_a_problem_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_bytes(b"name: wf\nversion: '1'\ndescription: caf\xe9\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (p,) = info.value.problems
    assert (p.file, p.line) == (str(path), 3) and "UTF-8" in p.message and "0xe9" in p.message


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "wf.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(document()).encode())
    assert load_manifest(path).name == "wf"


def test_manifest_error_is_bad_input_with_exit_code_2() -> None:
    with pytest.raises(InputError) as info:
        workflow_from_dict([])
    assert info.value.exit_code == 2
    assert "1 problem in manifest" in str(info.value)


# -- syntax errors carry their line --------------------------------------------------------


def test_yaml_syntax_error_carries_its_line() -> None:
    (p,) = yaml_problems("name: wf\nversion: '1'\nsymbols:\n  - name: [a\n")
    assert (p.file, p.line) == ("wf.yaml", 5) and "YAML syntax error" in p.message


def test_toml_syntax_error_carries_its_line() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest('name = "wf"\nversion = "1"\n[[symbols]]\nname = \n', "wf.toml", "toml")
    (p,) = info.value.problems
    assert (p.file, p.line) == ("wf.toml", 4) and "TOML syntax error" in p.message
    assert "at line" not in p.message


def test_json_syntax_error_carries_its_line() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest('{\n"name": "wf",\n"version": }', "wf.json", "json")
    (p,) = info.value.problems
    assert (p.file, p.line) == ("wf.json", 3) and "JSON syntax error" in p.message


def test_several_yaml_documents_are_refused() -> None:
    (p,) = yaml_problems("name: a\n---\nname: b\n")
    assert p.line == 2 and "single document" in p.message


def test_unsafe_yaml_tags_are_refused() -> None:
    (p,) = yaml_problems("name: !!python/object/apply:os.system ['true']\n")
    assert p.line == 1 and "python/object" in p.message


def test_duplicate_yaml_keys_are_reported_not_silently_dropped() -> None:
    found = yaml_problems(
        """\
        name: wf
        version: '1'
        symbols:
          - name: a
            type: action
            timeout: 10
            timeout: 20
        """
    )
    (p,) = found
    assert (p.field, p.line) == ("timeout", 7) and "duplicate key" in p.message


# -- YAML field problems carry lines ------------------------------------------------------


def test_yaml_field_problems_carry_the_line_of_their_key() -> None:
    found = yaml_problems(
        """\
        name: wf
        version: "1"
        mode: wave
        symbols:
          - name: a
            type: action
          - name: b
            type: action
            timeout: 30s
            dependencies:
              - a
              - c
        """
    )
    assert [(p.symbol, p.field, p.line) for p in found] == [
        (None, "mode", 3),
        ("b", "timeout", 9),
        ("b", "dependencies", 12),
    ]
    assert all(p.file == "wf.yaml" for p in found)


def test_a_symbol_that_is_not_a_mapping_is_reported_at_its_line() -> None:
    (p,) = yaml_problems("name: wf\nversion: '1'\nsymbols:\n  - {name: a, type: action}\n  - b\n")
    assert (p.symbol, p.field, p.line) == ("#2", None, 5) and "got string 'b'" in p.message


# -- YAML features behave as in yaml.safe_load --------------------------------------------


def test_yaml_anchors_aliases_and_merge_keys_work() -> None:
    w = parse_manifest(
        textwrap.dedent(
            """\
            name: wf
            version: 1.0
            defaults: &defaults
            symbols:
              - &base {name: a, type: action, dispatch: php_engine, timeout: 5}
              - <<: *base
                name: b
                dependencies: [a]
            """
        ).replace("defaults: &defaults\n", ""),
        "wf.yaml",
        "yaml",
    )
    assert w.version == "1.0"
    assert [(s.name, s.dispatch, s.timeout, s.dependencies) for s in w.symbols] == [
        ("a", "php_engine", 5, ()),
        ("b", "php_engine", 5, ("a",)),
    ]


YAML_VALUES = """\
plain: [hello, "quoted", 'single', 12, -3, 0x1f, 0o17, 017, 1_000, 1.5, .inf, -.INF, 6.02e+23]
truth: [yes, No, true, FALSE, on, off, y, n]
nothing: [~, null, '', ]
tagged: [!!str 12, !!int "7", !!float '2', ! plain-text, !!bool "true", !!null '']
text: |
  two
  lines
folded: >
  one
  line
when: 2024-01-02
at: 2024-01-02T03:04:05Z
sexagesimal: 1:30
keys: {1: one, 2.5: two, true: three, null: four}
merged: {<<: [{a: 1, b: 1}, {b: 2, c: 2}], c: 3}
merged_one: {<<: {a: 1}, a: 2}
shared: [&x {k: v}, *x]
? [complex, key]
: no
"""


def typed(value: object) -> object:
    """`value` with the type of every leaf made visible (1 == 1.0 == True otherwise)."""
    if isinstance(value, dict):
        return {typed(k): typed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def test_yaml_documents_build_exactly_as_safe_load_builds_them() -> None:
    # The fast event-driven builder must be indistinguishable from PyYAML's own.
    try:
        expected = yaml.safe_load(YAML_VALUES)
    except yaml.YAMLError:  # a list as a key: PyYAML refuses it, and so must we
        text = YAML_VALUES.replace("? [complex, key]\n: no\n", "")
        expected = yaml.safe_load(text)
        with pytest.raises(yaml.YAMLError, match="unhashable"):
            manifest._read_yaml(YAML_VALUES, manifest._Lines())
    else:
        text = YAML_VALUES
    for record in (True, False):  # with and without the lines of keys and items
        built = manifest._read_yaml(text, manifest._Lines(record))
        assert typed(built) == typed(expected)


def test_explicit_container_tags_fall_back_to_pyyaml() -> None:
    text = "s: !!set {a, b}\no: !!omap [{x: 1}]\n"
    assert manifest._read_yaml(text, manifest._Lines()) == yaml.safe_load(text)


def test_yaml_aliases_keep_sharing_structure_instead_of_copying() -> None:
    built = manifest._read_yaml("a: &x {k: [1, 2]}\nb: *x\n", manifest._Lines())
    assert isinstance(built, dict) and built["a"] is built["b"]


def test_an_undefined_yaml_alias_is_a_syntax_error_with_its_line() -> None:
    (p,) = yaml_problems("name: wf\nversion: *nope\n")
    assert p.line == 2 and "undefined alias" in p.message


# -- top level -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "got"),
    [([], "a list"), ("text", "string 'text'"), (None, "an empty document"), (3, "integer 3")],
)
def test_top_level_must_be_a_mapping(doc: object, got: str) -> None:
    p = problem(doc)
    assert_at(p, None, None, "top level must be a mapping", got)


def test_an_empty_yaml_file_is_reported_as_empty() -> None:
    (p,) = yaml_problems("")
    assert "empty document" in p.message


@pytest.mark.parametrize("field", ["name", "version"])
def test_name_and_version_are_required(field: str) -> None:
    doc = document()
    del doc[field]
    assert_at(problem(doc), None, field, "required field is missing")


@pytest.mark.parametrize("field", ["name", "version"])
def test_name_and_version_must_not_be_empty(field: str) -> None:
    assert_at(problem(document(**{field: "  "})), None, field, "must not be empty")


@pytest.mark.parametrize(("given", "kept"), [(1, "1"), (1.0, "1.0"), (2.5, "2.5"), ("v3", "v3")])
def test_numeric_versions_become_strings(given: object, kept: str) -> None:
    assert workflow_from_dict(document(version=given)).version == kept


def test_a_boolean_is_not_a_version() -> None:
    assert_at(
        problem(document(version=True)), None, "version", "expected a string, got boolean true"
    )


def test_top_level_fields_are_type_checked() -> None:
    found = problems(document(description=5, mode="wave", on_failure="stop", name=["x"]))
    assert [(p.symbol, p.field) for p in found] == [
        (None, "name"),
        (None, "description"),
        (None, "mode"),
        (None, "on_failure"),
    ]
    assert "expected a string, got a list" in found[0].message
    assert (
        "unknown mode 'wave': expected one of rolling, waves (did you mean 'waves'?)"
        in found[2].message
    )
    assert "expected one of rollback, continue, abort" in found[3].message


def test_mode_and_on_failure_have_defaults() -> None:
    w = workflow_from_dict(document())
    assert (w.mode, w.on_failure, w.description, w.resources) == ("rolling", "rollback", "", {})


def test_resource_capacities_are_positive_integers() -> None:
    assert workflow_from_dict(document(resources={"db": 2})).resources == {"db": 2}
    found = problems(document(resources={"db": 0, "net": True, "disk": "2"}))
    assert [p.field for p in found] == ["resources"] * 3
    assert "capacity of 'db' must be an integer 1 or more, got integer 0" in found[0].message
    assert "boolean true" in found[1].message and "string '2'" in found[2].message
    assert_at(
        problem(document(resources=["db"])), None, "resources", "expected a mapping, got a list"
    )


def test_unknown_top_level_key_is_named_with_a_suggestion() -> None:
    doc = document()
    doc["symbol"] = doc.pop("symbols")
    found = problems(doc)
    assert_at(found[0], None, "symbol", "unknown key 'symbol'", "did you mean 'symbols'?")
    assert_at(found[1], None, "symbols", "required field is missing")


@pytest.mark.parametrize(
    ("symbols", "got"), [([], "an empty list"), ({"a": {}}, "a mapping"), ("a", "string 'a'")]
)
def test_symbols_must_be_a_non_empty_list(symbols: object, got: str) -> None:
    doc = document()
    doc["symbols"] = symbols
    assert_at(problem(doc), None, "symbols", "expected a non-empty list of symbols", got)


# -- symbols: names --------------------------------------------------------------------------


def test_a_symbol_that_is_not_a_mapping_is_named_by_its_position() -> None:
    assert_at(
        problem(document({"name": "a", "type": "action"}, "b")), "#2", None, "expected a mapping"
    )


def test_a_symbol_without_a_name_is_named_by_its_position() -> None:
    p = problem(document({"name": "a", "type": "action"}, {"type": "action"}))
    assert_at(p, "#2", "name", "required field is missing")


def test_a_symbol_name_of_the_wrong_type_is_reported() -> None:
    assert_at(problem(document({"name": 7, "type": "action"})), "#1", "name", "got integer 7")


@pytest.mark.parametrize("name", ["has space", "a/b", "", "é"])
def test_symbol_names_are_restricted_to_a_safe_alphabet(name: str) -> None:
    p = problem(document({"name": name, "type": "action"}))
    assert_at(p, "#1", "name", f"invalid name {name!r}")


def test_names_may_use_letters_digits_dot_dash_and_underscore() -> None:
    w = workflow_from_dict(document({"name": "Deploy_site-2.0", "type": "action"}))
    assert w.symbols[0].name == "Deploy_site-2.0"


def test_duplicate_symbol_names_are_reported_on_the_later_one() -> None:
    doc = document(*({"name": "a", "type": "action"} for _ in range(3)))
    found = problems(doc)
    assert len(found) == 2
    for p in found:
        assert_at(p, "a", "name", "duplicate symbol name 'a'", "symbol #1 has it too")


# -- symbols: fields -------------------------------------------------------------------------


def test_a_minimal_symbol_gets_every_default() -> None:
    (s,) = workflow_from_dict(document({"name": "a", "type": "query"})).symbols
    assert s == Symbol(name="a", type="query")
    assert (s.context, s.dispatch, s.timeout, s.retries, s.priority) == (
        "generic",
        "internal",
        30_000,
        None,  # unset: the dispatcher's [coordinator] task_retry_limit applies
        0,
    )


def test_null_fields_mean_the_default() -> None:
    # YAML `dependencies:` with nothing after it is null; users mean "none".
    raw = {"name": "a", "type": "action", "dependencies": None, "parameters": None, "timeout": None}
    assert workflow_from_dict(document(raw)).symbols[0] == Symbol(name="a", type="action")


def test_type_is_required() -> None:
    p = problem(document({"name": "a"}))
    assert_at(
        p, "a", "type", "required field is missing", "action, filter, state, query, transform"
    )


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("type", "acton", "did you mean 'action'?"),
        ("context", "wordpres", "did you mean 'wordpress'?"),
        (
            "dispatch",
            "php",
            "expected one of rust_injector, php_engine, powershell_engine, internal",
        ),
    ],
)
def test_unknown_type_context_and_dispatch_values_are_named(
    field: str, value: str, hint: str
) -> None:
    p = problem(document({"name": "a", "type": "action", field: value}))
    assert_at(p, "a", field, f"unknown {field} {value!r}", hint)


def test_a_non_string_choice_is_described() -> None:
    p = problem(document({"name": "a", "type": ["action"]}))
    assert_at(p, "a", "type", "unknown type a list")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("timeout", "30s", ["expected an integer (milliseconds), got string '30s'", "write 30000"]),
        ("timeout", "30000", ["got string '30000'", "write 30000 without quotes"]),
        ("timeout", 1.5, ["expected an integer (milliseconds), got number 1.5"]),
        ("timeout", -5, ["must be greater than 0 (milliseconds), got -5"]),
        ("timeout", 0, ["must be greater than 0 (milliseconds), got 0"]),
        ("retries", -1, ["must be 0 or more, got -1"]),
        ("retries", "3", ["expected an integer, got string '3'"]),
        ("priority", True, ["expected an integer, got boolean true"]),
        ("priority", 2.0, ["expected an integer, got number 2.0"]),
        ("deadline", 0, ["must be greater than 0 (milliseconds)"]),
        ("deadline", "1m", ["write 60000"]),
        ("description", 3, ["expected a string, got integer 3"]),
        ("parameters", ["op"], ["expected a mapping, got a list"]),
        ("requires", "gpu", ["expected a mapping, got string 'gpu'"]),
        ("rollback", "undo", ["expected a mapping, got string 'undo'"]),
        ("retry", 3, ["expected a mapping, got integer 3"]),
        ("resources", "db:write", ["expected a list of strings", "write [db:write]"]),
        ("resources", ["db", 3], ["expected a list of non-empty strings, got integer 3"]),
        ("resources", ["db", ""], ["got string ''"]),
    ],
)
def test_wrong_values_name_the_field_and_say_what_was_expected(
    field: str, value: object, words: list[str]
) -> None:
    p = problem(document({"name": "a", "type": "action", field: value}))
    assert_at(p, "a", field, *words)


def test_negative_priority_is_allowed() -> None:
    assert (
        workflow_from_dict(document({"name": "a", "type": "action", "priority": -4}))
        .symbols[0]
        .priority
        == -4
    )


def test_every_symbol_field_is_read() -> None:
    raw = {
        "name": "a",
        "type": "state",
        "context": "database",
        "dispatch": "rust_injector",
        "parameters": {"table": "t", "nested": {"list": [1, None, 2.5, True]}},
        "priority": 5,
        "timeout": 1000,
        "retries": 0,
        "resources": ["db:write", "net"],
        "description": "the first",
        "deadline": 60_000,
        "requires": {"region": "eu"},
        "retry": {"initial_delay": 10, "max_delay": 100, "backoff_factor": 3, "jitter": 0},
    }
    (s,) = workflow_from_dict(document(raw)).symbols
    assert s == Symbol(
        name="a",
        type="state",
        context="database",
        dispatch="rust_injector",
        parameters=raw["parameters"],
        priority=5,
        timeout=1000,
        retries=0,
        resources=("db:write", "net"),
        description="the first",
        deadline=60_000,
        requires={"region": "eu"},
        retry=RetryPolicy(10, 100, 3.0, 0.0),
    )
    assert isinstance(s.retry and s.retry.backoff_factor, float)


def test_a_resource_listed_twice_is_reported() -> None:
    p = problem(document({"name": "a", "type": "action", "resources": ["db", "net", "db"]}))
    assert_at(p, "a", "resources", "listed more than once: 'db'")


def test_requires_values_are_strings() -> None:
    p = problem(document({"name": "a", "type": "action", "requires": {"gpu": True}}))
    assert_at(p, "a", "requires", "label 'gpu' must be a string, got boolean true (quote it)")


def test_unknown_symbol_key_is_named_with_a_suggestion() -> None:
    p = problem(document({"name": "a", "type": "action", "timout": 5}))
    assert_at(p, "a", "timout", "unknown key 'timout'", "did you mean 'timeout'?")


def test_an_unknown_key_far_from_any_gets_no_suggestion() -> None:
    p = problem(document({"name": "a", "type": "action", "zzz": 5}))
    assert_at(p, "a", "zzz", "unknown key 'zzz'")
    assert "did you mean" not in p.message


def test_non_string_keys_are_reported() -> None:
    p = problem(document({"name": "a", "type": "action", 5: "x"}))
    assert_at(p, "a", None, "keys must be strings, got integer 5")


# -- parameters are data that JSON and msgpack can carry ------------------------------------


def test_parameters_that_json_cannot_carry_are_reported_with_their_path() -> None:
    found = yaml_problems(
        """\
        name: wf
        version: '1'
        symbols:
          - name: a
            type: action
            parameters:
              when:
                - 2024-01-02
        """
    )
    (p,) = found
    assert (p.symbol, p.field, p.line) == ("a", "parameters", 8)
    assert "parameters.when[0]: expected JSON-like data, got date 2024-01-02" in p.message
    assert "quote it" in p.message


def test_parameters_with_non_string_keys_are_reported() -> None:
    p = problem(document({"name": "a", "type": "action", "parameters": {"m": {1: "x"}}}))
    assert_at(p, "a", "parameters", "parameters.m: mapping keys must be strings")


def test_a_yaml_structure_that_contains_itself_is_reported_not_crashed_on() -> None:
    found = yaml_problems(
        "name: wf\nversion: '1'\nsymbols:\n  - name: a\n    type: action\n"
        "    parameters: &p {self: *p}\n"
    )
    (p,) = found
    assert (p.symbol, p.field) == ("a", "parameters") and "contains itself" in p.message


def test_shared_yaml_parameters_are_fine() -> None:
    w = parse_manifest(
        "name: wf\nversion: '1'\nsymbols:\n"
        "  - {name: a, type: action, parameters: {x: &l [1, 2]}}\n"
        "  - {name: b, type: action, parameters: {x: *l, y: *l}}\n",
        "wf.yaml",
        "yaml",
    )
    assert w.symbols[1].parameters == {"x": [1, 2], "y": [1, 2]}


# -- dependencies --------------------------------------------------------------------------


def test_dependencies_may_point_forward_in_the_manifest() -> None:
    w = workflow_from_dict(
        document(
            {"name": "b", "type": "action", "dependencies": ["a"]}, {"name": "a", "type": "action"}
        )
    )
    assert w.symbols[0].dependencies == ("a",)


def test_a_single_dependency_string_is_an_error_with_a_hint() -> None:
    p = problem(
        document(
            {"name": "a", "type": "action"}, {"name": "b", "type": "action", "dependencies": "a"}
        )
    )
    assert_at(
        p, "b", "dependencies", "expected a list of symbol names, got string 'a'", "write [a]"
    )


def test_unknown_dependency_is_named_with_a_suggestion() -> None:
    p = problem(
        document(
            {"name": "build", "type": "action"},
            {"name": "b", "type": "action", "dependencies": ["biuld"]},
        )
    )
    assert_at(p, "b", "dependencies", "unknown dependency 'biuld'", "did you mean 'build'?")


@pytest.mark.parametrize(
    ("deps", "words"),
    [
        (["b"], "a symbol cannot depend on itself"),
        (["a", "a"], "dependency 'a' is listed twice"),
        (["a", 3], "expected a symbol name, got integer 3"),
        ({"a": 1}, "got a mapping"),
    ],
)
def test_bad_dependency_entries_are_reported(deps: object, words: str) -> None:
    p = problem(
        document(
            {"name": "a", "type": "action"}, {"name": "b", "type": "action", "dependencies": deps}
        )
    )
    assert_at(p, "b", "dependencies", words)


def test_cycle_is_reported_with_its_path() -> None:
    doc = document(
        {"name": "a", "type": "action", "dependencies": ["c"]},
        {"name": "b", "type": "action", "dependencies": ["a"]},
        {"name": "c", "type": "action", "dependencies": ["b"]},
    )
    assert_at(problem(doc), "a", "dependencies", "dependency cycle: a -> c -> b -> a")


def test_each_independent_cycle_is_reported() -> None:
    doc = document(
        {"name": "x", "type": "action"},
        {"name": "p", "type": "action", "dependencies": ["q", "x"]},
        {"name": "q", "type": "action", "dependencies": ["p"]},
        {"name": "r", "type": "action", "dependencies": ["s"]},
        {"name": "s", "type": "action", "dependencies": ["r", "p"]},
    )
    messages = [p.message for p in problems(doc)]
    assert messages == ["dependency cycle: p -> q -> p", "dependency cycle: r -> s -> r"]


def test_a_cycle_in_yaml_carries_the_line_of_its_dependencies() -> None:
    (p,) = yaml_problems(
        "name: wf\nversion: '1'\nsymbols:\n  - name: a\n    type: action\n    dependencies: [b]\n"
        "  - {name: b, type: action, dependencies: [a]}\n"
    )
    assert (p.symbol, p.field, p.line) == ("a", "dependencies", 6)


# -- rollback and retry ----------------------------------------------------------------------


def test_rollback_defaults_follow_its_symbol() -> None:
    raw = {
        "name": "a",
        "type": "filter",
        "dispatch": "php_engine",
        "context": "wordpress",
        "rollback": {"parameters": {"operation": "restore"}},
    }
    (s,) = workflow_from_dict(document(raw)).symbols
    assert s.rollback == RollbackSpec(
        name="rollback_a",
        type="action",
        context="wordpress",
        dispatch="php_engine",
        parameters={"operation": "restore"},
    )


def test_rollback_fields_are_checked_like_a_symbols() -> None:
    rollback = {
        "name": "un do",
        "type": "undo",
        "context": "cloud",
        "dispatch": "bash",
        "parameters": [],
        "timeout": -1,
        "retries": "x",
        "timout": 1,
    }
    found = problems(document({"name": "a", "type": "action", "rollback": rollback}))
    assert {p.field for p in found} == {
        "rollback.timout",
        "rollback.name",
        "rollback.type",
        "rollback.context",
        "rollback.dispatch",
        "rollback.parameters",
        "rollback.timeout",
        "rollback.retries",
    }
    assert all((p.file, p.symbol) == (SOURCE, "a") for p in found)
    assert (
        "did you mean 'timeout'?" in next(p for p in found if p.field == "rollback.timout").message
    )


def test_a_rollback_has_no_dependencies_of_its_own() -> None:
    raw = {"name": "a", "type": "action", "rollback": {"dependencies": ["a"]}}
    assert_at(
        problem(document(raw)),
        "a",
        "rollback.dependencies",
        "a rollback has no dependencies of its own",
    )


def test_retry_missing_keys_take_the_defaults() -> None:
    (s,) = workflow_from_dict(
        document({"name": "a", "type": "action", "retry": {"jitter": 0.5}})
    ).symbols
    assert s.retry == RetryPolicy(jitter=0.5)


@pytest.mark.parametrize(
    ("retry", "field", "words"),
    [
        ({"initial_delay": -1}, "retry.initial_delay", "must be 0 or more (milliseconds), got -1"),
        ({"max_delay": "1s"}, "retry.max_delay", "write 1000"),
        ({"backoff_factor": 0.5}, "retry.backoff_factor", "must be at least 1, got 0.5"),
        ({"backoff_factor": "2"}, "retry.backoff_factor", "expected a number, got string '2'"),
        ({"jitter": 1.5}, "retry.jitter", "must be between 0 and 1, got 1.5"),
        ({"jitter": float("nan")}, "retry.jitter", "must be between 0 and 1"),
        ({"jitter": True}, "retry.jitter", "got boolean true"),
        ({"initial_delay": 500, "max_delay": 100}, "retry.max_delay", "less than initial_delay"),
        ({"delay": 5}, "retry.delay", "unknown key 'delay'"),
    ],
)
def test_retry_policy_values_are_checked(retry: dict[str, Any], field: str, words: str) -> None:
    assert_at(problem(document({"name": "a", "type": "action", "retry": retry})), "a", field, words)


# -- all at once -----------------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    doc = {
        "version": "1",
        "mode": "fast",
        "symbols": [
            {"name": "a", "type": "acton", "timeout": "30s"},
            {"name": "a", "type": "action"},
            {"type": "action", "dependencies": ["zz"]},
            {"name": "c", "type": "action", "rollback": {"dependencies": []}, "retries": -1},
        ],
    }
    found = problems(doc)
    assert [(p.symbol, p.field) for p in found] == [
        (None, "name"),
        (None, "mode"),
        ("a", "type"),
        ("a", "timeout"),
        ("a", "name"),
        ("#3", "name"),
        ("#3", "dependencies"),
        ("c", "rollback.dependencies"),
        ("c", "retries"),
    ]
    assert all(p.file == SOURCE for p in found)
    assert str(found[3]) == (
        "wf.json: symbol 'a': field 'timeout': expected an integer (milliseconds), "
        "got string '30s' (write 30000 without quotes or units)"
    )


def test_a_bad_manifest_gives_no_workflow_even_when_most_symbols_are_fine() -> None:
    symbols = [{"name": f"s{i}", "type": "action"} for i in range(50)]
    symbols[40]["timeout"] = -1
    assert_at(problem(document(*symbols)), "s40", "timeout")


# -- round trips -----------------------------------------------------------------------------


def rich_workflow() -> Workflow:
    return Workflow(
        name="wf",
        version="2",
        description="all of it",
        mode="waves",
        on_failure="continue",
        resources={"db": 2},
        symbols=(
            Symbol(
                name="a",
                type="action",
                parameters={"x": [1, {"y": None}]},
                priority=3,
                timeout=10,
                retries=0,
                resources=("db",),
                description="first",
                retry=RetryPolicy(5, 50, 1.5, 0.25),
                deadline=1000,
                requires={"os": "linux"},
                rollback=RollbackSpec(
                    name="undo_a",
                    dispatch="php_engine",
                    context="wordpress",
                    parameters={"op": "restore"},
                    timeout=7,
                    retries=1,
                ),
            ),
            Symbol(
                name="b",
                type="query",
                context="network",
                dispatch="rust_injector",
                dependencies=("a",),
                rollback=RollbackSpec(name="rollback_b"),
            ),
        ),
    )


def test_workflow_from_dict_round_trips_to_dict() -> None:
    w = rich_workflow()
    assert workflow_from_dict(w.to_dict()) == w
    assert workflow_from_dict(w.to_dict(), "elsewhere").source == "elsewhere"


def test_round_trip_survives_json_and_yaml_text(tmp_path: Path) -> None:
    w = rich_workflow()
    (tmp_path / "w.json").write_text(json.dumps(w.to_dict()))
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(w.to_dict(), sort_keys=False))
    for path in (tmp_path / "w.json", tmp_path / "w.yaml"):
        loaded = load_manifest(path)
        assert loaded.to_dict() == w.to_dict() and loaded.content_hash == w.content_hash


def test_validation_does_not_change_the_document() -> None:
    doc = rich_workflow().to_dict()
    before = copy.deepcopy(doc)
    workflow_from_dict(doc)
    assert doc == before


def test_fixture_manifests_load() -> None:
    w = load_manifest(FIXTURES / "deploy.yaml")
    assert len(w.symbols) == 5 and w.mode == "waves"
    assert load_manifest(FIXTURES / "deploy.toml").to_dict() == w.to_dict()


def test_a_yaml_version_keeps_the_digits_as_written() -> None:
    text = "name: wf\nversion: {}\nsymbols: [{{name: a, type: action}}]\n"
    assert parse_manifest(text.format("1.10"), "wf.yaml", "yaml").version == "1.10"
    assert parse_manifest(text.format("2"), "wf.yaml", "yaml").version == "2"
    assert parse_manifest(text.format("'1.2.3'"), "wf.yaml", "yaml").version == "1.2.3"


@pytest.mark.parametrize("text", ["name: <<\n", "name: [<<]\n", "<<\n"])
def test_a_merge_key_anywhere_but_a_key_is_refused_as_pyyaml_does(text: str) -> None:
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)
    (p,) = yaml_problems(text)
    assert p.line == 1 and "'<<'" in p.message


def test_tuples_from_python_callers_count_as_lists() -> None:
    doc = document(
        {"name": "a", "type": "action", "resources": ("db",)},
        {"name": "b", "type": "action", "dependencies": ("a",), "parameters": {"p": (1, 2)}},
    )
    doc["symbols"] = tuple(doc["symbols"])
    w = workflow_from_dict(doc)
    assert w.symbols[0].resources == ("db",) and w.symbols[1].dependencies == ("a",)


@pytest.mark.parametrize("name", ["-rf", "--symbol", "-"])
def test_a_symbol_name_starting_with_a_dash_is_refused_by_name(name: str) -> None:
    # Names reach backend command lines (`--symbol NAME`): a leading '-' reads as an option.
    p = problem(document({"name": name, "type": "action"}))
    assert_at(p, name, "name", f"invalid name {name!r}", "must not start with '-'")


def test_a_rollback_name_starting_with_a_dash_is_refused() -> None:
    p = problem(document({"name": "a", "type": "action", "rollback": {"name": "--help"}}))
    assert_at(p, "a", "rollback.name", "invalid name '--help'", "must not start with '-'")


def test_a_dash_name_in_a_manifest_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text("name: wf\nversion: '1'\nsymbols:\n  - {name: -x, type: action}\n")
    cp = subprocess.run([sys.executable, "-m", "swarm", "validate", str(path)],
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PYTHONPATH": str(FIXTURES.parent.parent)})
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert "'-x'" in cp.stdout + cp.stderr and "must not start with '-'" in cp.stdout + cp.stderr


def test_wait_for_worker_at_the_top_and_per_symbol_the_symbols_wins() -> None:
    w = parse_manifest(textwrap.dedent("""
        name: w
        version: "1"
        wait_for_worker: 30000
        symbols:
          - {name: a, type: action, wait_for_worker: 0}
          - {name: b, type: action}
    """), "w.yaml", "yaml")
    assert w.wait_for_worker == 30_000
    assert [w.wait_for_worker_of(s) for s in w.symbols] == [0, 30_000]
    assert workflow_from_dict(w.to_dict()).to_dict() == w.to_dict()  # kept, both
    toml = parse_manifest(textwrap.dedent("""
        name = "w"
        version = "1"
        wait_for_worker = 5
        [[symbols]]
        name = "a"
        type = "action"
        wait_for_worker = 7
    """), "w.toml", "toml")
    assert (toml.wait_for_worker, toml.symbols[0].wait_for_worker) == (5, 7)


def test_wait_for_worker_absent_leaves_the_content_hash_unchanged() -> None:
    plain = workflow_from_dict(document())
    assert "wait_for_worker" not in json.dumps(plain.to_dict())
    assert plain.wait_for_worker is None and plain.wait_for_worker_of(plain.symbols[0]) is None
    assert workflow_from_dict(document(wait_for_worker=1)).content_hash != plain.content_hash


def test_bad_wait_for_worker_values_are_reported_with_their_place() -> None:
    found = problems(document({"name": "a", "type": "action", "wait_for_worker": -1},
                              {"name": "b", "type": "action", "wait_for_worker": "5s"},
                              wait_for_worker=True))
    assert [(p.symbol, p.field) for p in found] == [
        (None, "wait_for_worker"), ("a", "wait_for_worker"), ("b", "wait_for_worker")]
    assert "must be 0 or more (milliseconds), got -1" in found[1].message
    assert "expected an integer (milliseconds)" in found[2].message
