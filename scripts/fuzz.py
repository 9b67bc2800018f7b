#!/usr/bin/env python3
"""Long fuzz runs of the properties in tests/test_fuzz.py (same strategies, same checks).

    python scripts/fuzz.py --seconds 600 --target all
    python scripts/fuzz.py --seconds 120 --target decode
    python scripts/fuzz.py --seconds 300 --target manifest --property "near-valid (yaml)"
    python scripts/fuzz.py --seconds 60 --target config --seed 1234 --strict

Targets: `decode` (protocol.decode: only RemoteProtocolError; what decodes round-trips),
`manifest` (parse_manifest / workflow_from_dict: only ManifestError with complete
problems; what loads round-trips and can be sent; valid documents load as written),
`config` (parse_config: only ConfigError; accepted configs keep their bounds), `all`.

The time is split evenly over the selected properties. Each property runs hypothesis in
rounds of `--chunk` examples, round r with seed `--seed + r`, so a run is reproducible
from the seed it prints. A failure is shrunk by hypothesis, then printed once per distinct
(exception, place) with its smallest input and traceback; the run goes on with the next
round. Failures that are known bugs (KNOWN_BUGS in tests/test_fuzz.py, each pinned by a
strict xfail there) are only counted, unless `--strict`.

Exit status: 0 no failure, 1 at least one failure, 2 bad usage, 130 interrupted.
Needs the test extras (hypothesis, pytest): `pip install -e .[test]`.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import msgpack  # noqa: E402
import test_fuzz as tf  # noqa: E402
from hypothesis import HealthCheck, Verbosity, given, settings  # noqa: E402
from hypothesis import seed as with_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

Check = Callable[[Any], None]


def _packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _properties() -> dict[str, list[tuple[str, st.SearchStrategy[Any], Check]]]:
    manifest: list[tuple[str, st.SearchStrategy[Any], Check]] = []
    for fmt, tokens in (("yaml", tf.YAML_TOKENS), ("toml", tf.TOML_TOKENS),
                        ("json", tf.JSON_TOKENS)):
        text_check = functools.partial(tf.check_manifest_text, fmt=fmt)
        manifest += [
            (f"arbitrary text ({fmt})", st.text(max_size=2000), text_check),
            (f"token soup ({fmt})", st.lists(tokens, max_size=200).map("".join), text_check),
        ]
    for fmt in ("yaml", "json", "toml", "dict"):
        manifest.append((f"near-valid ({fmt})", tf.near_valid_documents(),
                         functools.partial(tf.check_document, fmt=fmt)))
    manifest.append(("near-valid, any Python object", tf.near_valid_documents(tf.WRONG_OBJECTS),
                     functools.partial(tf.check_document, fmt="dict")))
    return {
        "decode": [
            ("arbitrary bytes", st.binary(max_size=4096) | st.text(max_size=256),
             tf.check_decode),
            ("arbitrary msgpack", tf.ANY_MSGPACK.map(_packed) | tf.frame_shaped(),
             tf.check_decode),
            ("mutated valid frames", tf.mutated_frames(), tf.check_decode),
            ("deeply nested frames", tf.deep_frames(), tf.check_decode),
            ("valid messages round-trip", tf.MESSAGE, tf.check_valid_message),
        ],
        "manifest": manifest,
        "config": [
            ("arbitrary text", st.text(max_size=2000), tf.check_config),
            ("near-valid TOML", tf.config_texts(), tf.check_config),
        ],
    }


@dataclass
class Failure:
    prop: str
    seed: int
    value: Any
    error: BaseException
    trace: str


@dataclass
class Tally:
    prop: str
    examples: int = 0
    rounds: int = 0
    seconds: float = 0.0
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)


def _place(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def run_property(prop: str, strategy: st.SearchStrategy[Any], check: Check, seconds: float,
                 first_seed: int, chunk: int) -> Tally:
    """Rounds of `chunk` examples until `seconds` are up (a round is not cut short)."""
    tally = Tally(prop)
    start = time.monotonic()
    seen: list[Any] = [None]

    def body(value: Any) -> None:
        tally.examples += 1
        seen[0] = value  # the last one run is the shrunk failing input
        check(value)

    while time.monotonic() - start < seconds:
        seed = first_seed + tally.rounds
        test = with_seed(seed)(settings(
            max_examples=chunk, deadline=None, database=None, derandomize=False,
            verbosity=Verbosity.quiet, report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
        )(given(strategy)(body)))
        tally.rounds += 1
        try:
            test()
        except Exception as e:
            key = (type(e).__name__, _place(e))
            if key not in tally.failures:
                tally.failures[key] = Failure(prop, seed, seen[0], e, traceback.format_exc())
                print(f"  FAILURE in {prop} (seed {seed}): {type(e).__name__}: "
                      f"{_short(str(e), 300)}", flush=True)
    tally.seconds = time.monotonic() - start
    return tally


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def main(argv: list[str] | None = None) -> int:
    props = _properties()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=600.0,
                    help="total time, split over the properties (default 600)")
    ap.add_argument("--target", choices=[*props, "all"], default="all")
    ap.add_argument("--property", default="",
                    help="only the properties whose name contains this text")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--chunk", type=int, default=200, help="examples per round (default 200)")
    ap.add_argument("--strict", action="store_true",
                    help="known bugs (tests/test_fuzz.py KNOWN_BUGS) count as failures too")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.chunk < 1:
        ap.error("--seconds and --chunk must be positive")
    selected = [(target, *prop) for target, ps in props.items()
                if args.target in (target, "all") for prop in ps
                if args.property in prop[0]]
    if not selected:
        ap.error(f"no property of {args.target!r} matches {args.property!r}")
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    tf.TOLERATE_KNOWN = not args.strict
    share = args.seconds / len(selected)
    print(f"fuzzing {len(selected)} properties for {args.seconds:g} s "
          f"({share:.1f} s each), seed {seed}, {args.chunk} examples per round", flush=True)

    tallies: list[Tally] = []
    interrupted = False
    try:
        for target, name, strategy, check in selected:
            tally = run_property(f"{target}: {name}", strategy, check, share, seed, args.chunk)
            tallies.append(tally)
            print(f"{tally.prop}: {tally.examples} examples in {tally.rounds} rounds, "
                  f"{tally.seconds:.1f} s, {len(tally.failures)} failures", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", flush=True)

    failures = [f for t in tallies for f in t.failures.values()]
    total = sum(t.examples for t in tallies)
    print(f"\n{total} examples, {len(failures)} distinct failures")
    if tf.KNOWN_HITS:
        print("known bugs hit (each pinned by a strict xfail in tests/test_fuzz.py):")
        summaries = {b.key: b.summary for b in tf.KNOWN_BUGS}
        for key, n in tf.KNOWN_HITS.most_common():
            print(f"  {n:7d}  {key}: {summaries[key]}")
    for f in failures:
        print(f"\n=== {f.prop} (seed {f.seed}): {type(f.error).__name__}")
        print(f"input: {_short(repr(f.value), 4000)}")
        print(_short(f.trace, 8000))
    if failures:
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
