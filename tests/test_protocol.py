"""Wire messages: round trips and validation at the boundary."""

from __future__ import annotations

import msgpack
import pytest

from swarm import protocol as p
from swarm.errors import RemoteProtocolError

TASK = p.TaskAssignment(task_id="r/a", run_id="r", symbol="a", type="action",
                        context="generic", dispatch="internal", parameters={"k": [1, "x"]},
                        attempt=1, token=7, timeout=30_000)

MESSAGES = [
    p.Challenge(nonce=b"\x00" * 16, auth=True),
    p.Hello(role="worker", name="w1", capabilities=("internal", "php_engine"), slots=4,
            labels={"zone": "a"}, proof=b"x" * 32, running=(1, 2), pid=42),
    p.Welcome(node_id="w1#1", heartbeat_interval=5000, version="0.1.0"),
    p.Assign(tasks=(TASK, TASK)),
    p.Results(items=(p.TaskResult(token=7, task_id="r/a", ok=False, output={"a": None},
                                  error="boom", exit_code=3, retryable=False, timed_out=False,
                                  duration_ms=12.5, stderr="err", stdout_truncated=True),)),
    p.Ack(tokens=(7, 8)),
    p.Heartbeat(free=2, running=(7,)),
    p.Abandon(tokens=(9,)),
    p.Draining(),
    p.Request(id=1, op="deploy", args={"workflow": {"name": "x"}, "follow": True}),
    p.Reply(id=1, ok=False, error="no", code=2),
    p.Event(kind="symbol.completed", ts=1.5, run_id="r", symbol="a", node="w1", attempt=1,
            data={"output": "ok"}),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.T)
def test_every_message_round_trips(msg: p.Message) -> None:
    assert p.decode(p.encode(msg)) == msg


def frame(d: object) -> bytes:
    return msgpack.packb(d, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("raw, why", [
    (b"\xc1", "undecodable"),
    (frame([1, 2]), "must be a msgpack map"),
    (frame({"t": "nope"}), "unknown message type"),
    (frame({"t": "ack"}), "lacks field 'tokens'"),
    (frame({"t": "ack", "tokens": [1], "extra": 1}), "unknown field 'extra'"),
    (frame({"t": "ack", "tokens": ["1"]}), "expected int"),
    (frame({"t": "heartbeat", "free": True}), "expected int"),
    (frame({"t": "hello", "role": "worker", "name": 5}), "expected str"),
    (frame({"t": "request", "id": 1, "op": "rm -rf"}), "unknown request op"),
    (frame({"t": "request", "id": 1, "op": "run", "args": {}}), "lacks argument 'run_id'"),
    (frame({"t": "request", "id": 1, "op": "run", "args": {"run_id": 3}}), "expected str"),
    (frame({1: 2}), "undecodable"),
    (msgpack.packb(msgpack.ExtType(1, b"x")), "ext types are not allowed"),
    (frame({"t": "hello", "role": "worker", "name": "w", "labels": {b"k": "v"}}),
     "string map keys"),
    (frame({"t": "results", "items": [{"token": 1, "task_id": "x", "ok": True,
                                       "output": {b"k": 1}}]}), "string map keys"),
    (frame({"t": "results", "items": [{"token": 1, "task_id": "x", "ok": True,
                                       "exit_code": 2**64 - 1}]}), "64-bit integer"),
    (frame({"t": "event", "kind": "k", "ts": 1.0, "data": {"x": [[[[1]]]] * 1}}), None),
])
def test_malformed_frames_raise_remote_protocol_error(raw: bytes, why: str | None) -> None:
    if why is None:  # the control case: well-formed, so it decodes
        p.decode(raw)
        return
    with pytest.raises(RemoteProtocolError, match=why):
        p.decode(raw)


def test_deeply_nested_data_is_refused_not_recursed_into() -> None:
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    with pytest.raises(RemoteProtocolError, match="nested deeper"):
        p.decode(frame({"t": "event", "kind": "k", "ts": 1.0, "data": {"x": deep}}))


def test_worker_turns_an_unsendable_output_into_a_failure() -> None:
    from swarm.worker import _sendable

    for output in ({"n": 2**70}, {1: "non-string key"}):
        r = _sendable(p.TaskResult(token=1, task_id="t", ok=True, output=output))
        assert not r.ok and not r.retryable and "cannot be sent" in r.error
    big = _sendable(p.TaskResult(token=1, task_id="t", ok=True, output="x" * (3 << 20)))
    assert big.ok and big.stdout_truncated and len(p.encode(p.Results((big,)))) < (1 << 20)


def test_text_frames_and_oversized_frames_are_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="text frames"):
        p.decode("{}")
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        p.decode(frame({"t": "ack", "tokens": list(range(1000))}), max_size=100)


def test_token_proof_is_an_hmac_over_the_nonce() -> None:
    nonce = b"n" * 16
    proof = p.proof_for("secret", nonce)
    assert p.check_proof("secret", nonce, proof)
    assert not p.check_proof("other", nonce, proof)
    assert not p.check_proof("secret", b"m" * 16, proof)
    assert b"secret" not in proof
