"""Nothing a backend starts outlives its attempt, nor the worker (issue #20, item 3).

A process group is not enough: a grandchild that calls `setsid` or double-forks leaves
it, and a worker killed with SIGKILL stops nobody. `start()` picks once per worker:

- **cgroup**: each attempt gets a cgroup v2 of its own, `<worker's cgroup>/swarm-<key>/<n>`,
  killed with `cgroup.kill` (kernel >= 5.14; else frozen and each member SIGKILLed) and
  removed when the attempt ends. Nothing leaves a cgroup without write access to another.
  The backend is placed before it can fork by moving the worker into the attempt's cgroup
  for the one synchronous step in which asyncio forks and execs it (a child starts in its
  parent's cgroup), then back: two writes of ~30 µs. Measured on a 2-core host, an exec
  wrapper (`sh` writing its own pid) cost 25% of the spawn rate and `preexec_fn` 63%.
- **subreaper** (no writable cgroup v2): the worker is a child subreaper, so what a
  backend leaves behind is reparented to the worker instead of init; each backend's
  environment carries `SWARM_CONTAIN=<key>:<n>`, by which the worker finds those orphans
  among its own children and SIGKILLs them when the attempt ends.

The worker's death: a watchdog process, started once per worker, holds the read end of a
pipe only the worker writes to. At EOF it kills the worker's whole `swarm-<key>` cgroup
subtree (cgroup), or every process whose environment carries the worker's key (subreaper),
then exits. A parent-death signal would need code in each child between fork and exec
(preexec_fn, see above), and would not reach the grandchildren anyway.

`SWARM_CONTAINMENT=subreaper` in the worker's environment forces the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

log = logging.getLogger("swarm.backends")

TAG = "SWARM_CONTAIN"  # environment variable marking a backend and all it starts
PREFIX = "swarm-"  # a worker's cgroup folder: swarm-<pid>-<start time>-<n>
REAP_S = 10.0  # how long the end of an attempt may take to see its processes gone
_PR_SET_CHILD_SUBREAPER = 36
_instances = itertools.count(1)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Containment:
    """What keeps this worker's backends from escaping, as `swarm start-worker` logs it."""

    mechanism: str  # "cgroup" | "subreaper"
    where: str  # the cgroup folder of this worker's attempts; "" for subreaper
    kill: str  # "cgroup.kill" | "freeze" (cgroup); "" for subreaper
    why: str  # why the fallback applies; "" for cgroup

    def describe(self) -> str:
        if self.mechanism == "cgroup":
            return f"cgroup v2 per attempt under {self.where} (ended with {self.kill})"
        return f"subreaper + {TAG} environment tag (no cgroup v2: {self.why})"


# --- detection ---------------------------------------------------------------------------


def process_key(pid: int) -> str:
    """`pid-starttime`: names a process unambiguously even after its pid is reused."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return f"{pid}-{int(fields[19])}"  # field 22 of stat: start time in clock ticks


def _key_alive(key: str) -> bool:
    """Whether the process of a containment key (`pid-starttime-n`) still runs."""
    try:
        pid, start = key.split("-")[:2]
        return process_key(int(pid)) == f"{pid}-{start}"
    except (OSError, ValueError, IndexError):
        return False


def own_cgroup_dir() -> tuple[str, str]:
    """(the folder of this process's cgroup v2, "") or ("", why there is none)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((ln[3:].strip() for ln in f if ln.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [ln.split() for ln in f]
    except OSError as e:
        return "", f"cannot read /proc: {e.strerror}"
    if path is None:
        return "", "this process is in no cgroup v2 hierarchy"
    for fields in mounts:
        sep = fields.index("-")
        if fields[sep + 1] != "cgroup2":
            continue
        root, point = fields[3], fields[4]
        if root == "/" or path == root or path.startswith(root + "/"):
            rel = path[len(root):] if root != "/" else path
            return os.path.join(point, rel.lstrip("/")), ""
    return "", f"no cgroup2 mount holds this process's cgroup {path}"


def sweep_cgroups(parent: str) -> list[str]:
    """Kill and remove the `swarm-*` folders of workers no longer alive; their names."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            if name.startswith(PREFIX) and not _key_alive(name[len(PREFIX):]):
                kill_cgroup(os.path.join(parent, name))
                if remove_cgroup_tree(os.path.join(parent, name), REAP_S):
                    removed.append(name)
    return removed


def _probe(where: str) -> str:
    """"" if this process can move into a cgroup below `where` and back, else why not."""
    own = os.path.dirname(where)
    probe = os.path.join(where, "probe")
    try:
        os.mkdir(probe)
        try:
            _write(os.path.join(probe, "cgroup.procs"), b"0")
            _write(os.path.join(own, "cgroup.procs"), b"0")
        finally:
            os.rmdir(probe)
    except OSError as e:
        return f"cannot move a process into a cgroup below {where}: {e.strerror or e}"
    return ""


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --- ending what is in a cgroup --------------------------------------------------------


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in the cgroup `path` and below it (no-op if it is gone)."""
    try:
        _write(os.path.join(path, "cgroup.kill"), b"1")
        return
    except FileNotFoundError:
        if not os.path.isdir(path):
            return
    except OSError:
        return
    # Before kernel 5.14: frozen members cannot fork while they are SIGKILLed one by one.
    with contextlib.suppress(OSError):
        _write(os.path.join(path, "cgroup.freeze"), b"1")
    for pid in _cgroup_pids(path):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        _write(os.path.join(path, "cgroup.freeze"), b"0")


def _cgroup_pids(path: str) -> list[int]:
    pids: list[int] = []
    for folder, _, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError), open(os.path.join(folder, "cgroup.procs")) as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def remove_cgroup_tree(path: str, wait_s: float) -> bool:
    """rmdir `path` and its sub-cgroups, waiting up to `wait_s` for killed members to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for folder, dirs, _ in os.walk(path, topdown=False):
                for d in dirs:
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(os.path.join(folder, d))
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        kill_cgroup(path)
        time.sleep(0.01)


# --- the subreaper fallback: finding a worker's tagged processes --------------------------


def _environ_tag(pid: int) -> str | None:
    """The value of SWARM_CONTAIN in the environment `pid` started with, if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:  # gone, or a zombie (whose environ reads empty or fails)
        return None
    marker = TAG.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(marker):
            return item[len(marker):].decode(errors="replace")
    return None


def own_children() -> list[int]:
    """Pids whose parent is this process's main thread: orphans are reparented to the
    first live thread of their subreaper, the main one while the worker runs."""
    pid = os.getpid()
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]
    pids: list[int] = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
            pids.extend(int(p) for p in f.read().split())
    return pids


def kill_tagged(
    pids: Iterator[int] | list[int], match: Callable[[str], bool]
) -> dict[int, str]:
    """SIGKILL those of `pids` whose tag satisfies `match`; pid -> tag of those signalled."""
    killed = {}
    for pid in pids:
        tag = _environ_tag(pid)
        if tag is not None and match(tag):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed[pid] = tag
    return killed


def all_pids() -> Iterator[int]:
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                yield int(name)


def _set_child_subreaper() -> str:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as e:
        return str(e)
    return ""


# --- placing a backend into its cgroup ----------------------------------------------------


@types.coroutine
def _first_step_inside(
    coro: Coroutine[Any, Any, T], enter: Callable[[], None], leave: Callable[[], None]
) -> Generator[Any, Any, T]:
    """Run `coro`, its first step between enter() and leave(), the rest as usual.

    asyncio forks and execs a subprocess in the first step of `loop.subprocess_exec`, so
    this puts the child into whatever cgroup enter() moved the worker to."""
    try:
        enter()
    except BaseException:
        coro.close()  # never started: nothing to undo
        raise
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        leave()
    while True:
        thrown: BaseException | None = None
        sent: Any = None
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # cancellation: passed on to the coroutine
            thrown = e
        try:
            pending = coro.throw(thrown) if thrown is not None else coro.send(sent)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


# --- per attempt ---------------------------------------------------------------------------


class _Cgroup:
    """An attempt cgroup, its files kept open: it is reused once found empty, because
    mkdir + rmdir + opening its files cost more than the rest of the containment."""

    def __init__(self, path: str) -> None:
        os.mkdir(path)
        self.path = path
        self.procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        self.events = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)

    def empty(self) -> bool:
        try:
            return b"populated 0" in os.pread(self.events, 256, 0)
        except OSError:
            return not os.path.isdir(self.path)

    def close(self) -> None:
        for fd in (self.procs, self.events):
            with contextlib.suppress(OSError):
                os.close(fd)


class Cage:
    """One attempt's containment: where its backend starts and how its leftovers die."""

    def __init__(self, owner: Containers, n: int, group: _Cgroup | None) -> None:
        self._owner = owner
        self.group = group
        self.tag = f"{owner.key}:{n}"
        self.leader = 0
        self.clean = False  # the leader has exited and nothing of the attempt is left
        self.released = False  # the attempt is over: a spawn not yet begun must not begin

    @property
    def path(self) -> str:
        return self.group.path if self.group is not None else ""

    def environment(self) -> dict[str, str]:
        """Variables to add to the backend's environment (the fallback's tag)."""
        return {} if self.group is not None else {TAG: self.tag}

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Wrap `loop.subprocess_exec(...)` so that the child starts inside the cage."""
        group = self.group
        if group is None:
            return self._note_leader(coro)

        def enter() -> None:
            self._refuse_if_released()
            os.write(group.procs, b"0")  # "0": the writing process, i.e. the worker

        async def inside() -> T:
            return await _first_step_inside(coro, enter, self._owner.come_back)

        return inside()

    async def _note_leader(self, coro: Coroutine[Any, Any, T]) -> T:
        # Leaders are the worker's children too: knowing them spares reading their environ.
        try:
            self._refuse_if_released()
        except OSError:
            coro.close()
            raise
        started = await coro
        self.leader = cast(asyncio.SubprocessTransport, cast(Any, started)[0]).get_pid()
        self._owner.leaders.add(self.leader)
        return started

    def _refuse_if_released(self) -> None:
        # The spawn runs as a task of its own: its attempt may have been cancelled and
        # released before that task's first step, and a cage given back is not this one's.
        if self.released:
            raise OSError(errno.ECANCELED, "the attempt ended before its backend started")

    def kill(self, leader_exited: bool = False) -> None:
        """SIGKILL all that is left of the attempt, wherever it went (no waiting). Once the
        leader has exited, an empty cage is only noted as clean: nothing to kill."""
        if self.clean:
            return
        if self.group is not None:
            if leader_exited and self.group.empty():
                self.clean = True
            else:
                kill_cgroup(self.group.path)
            return
        found = self._owner.reap_tagged(lambda tag: tag == self.tag)
        self.clean = leader_exited and not found

    def release(self) -> None:
        """The attempt is over: kill what is left and give the cage back; what does not die
        at once is finished by a background task of the worker (bounded by REAP_S)."""
        self.released = True
        self._owner.leaders.discard(self.leader)
        self.kill(leader_exited=True)
        if self.clean:
            self._owner.give_back(self)
        else:
            self._owner.finish_later(self)

    def gone(self) -> bool:
        """True once nothing of the attempt is left (then the cage is given back)."""
        self.kill(leader_exited=True)
        if self.clean:
            self._owner.give_back(self)
        return self.clean


# --- per worker ----------------------------------------------------------------------------


class Containers:
    """A worker's containment: cages for attempts, and a watchdog for the worker's death."""

    def __init__(self, info: Containment, key: str, watchdog: subprocess.Popen[bytes] | None,
                 pipe: int) -> None:
        self.info = info
        self.key = key
        self._watchdog = watchdog
        self._pipe = pipe  # write end; closing it (or dying) tells the watchdog to act
        self._count = 0
        self._own = -1  # the worker's own cgroup.procs, to come back to after each spawn
        if info.where:
            own_procs = os.path.join(os.path.dirname(info.where), "cgroup.procs")
            self._own = os.open(own_procs, os.O_WRONLY | os.O_CLOEXEC)
        self._free: list[_Cgroup] = []  # empty attempt cgroups, ready for the next attempt
        self.leaders: set[int] = set()  # subreaper: backends now running, not orphans
        self._killed: dict[int, str] = {}  # tagged orphans signalled, not yet reaped
        self._later: set[asyncio.Task[None]] = set()

    def cage(self) -> Cage:
        """A cage for one attempt (cgroup: an empty one, created if none is free)."""
        self._count += 1
        group = None
        if self.info.where:
            group = self._free.pop() if self._free else \
                _Cgroup(os.path.join(self.info.where, str(self._count)))
        return Cage(self, self._count, group)

    def give_back(self, cage: Cage) -> None:
        if cage.group is not None:
            self._free.append(cage.group)
            cage.group = None  # given back once; `clean` keeps kill() off it from now on

    def come_back(self) -> None:
        """Move the worker back into its own cgroup; staying in a cage would get it killed
        with the attempt, so a failure here is retried and then fatal."""
        for _ in range(3):
            try:
                os.write(self._own, b"0")
                return
            except OSError as e:
                error = e
        log.critical("cannot leave an attempt's cgroup (%s); exiting", error)
        os._exit(70)

    def reap_tagged(self, match: Callable[[str], bool]) -> bool:
        """Subreaper: SIGKILL the worker's children whose tag matches and reap those
        already dead; True while some signalled ones are not reaped yet."""
        watchdog = self._watchdog.pid if self._watchdog is not None else 0
        reaped = True
        while reaped:  # a reaped orphan's own children have just been reparented to us
            orphans = [p for p in own_children() if p not in self.leaders and p != watchdog]
            self._killed.update(kill_tagged(orphans, match))
            reaped = False
            for pid in list(self._killed):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)  # only pids we killed: not another's
                except ChildProcessError:
                    done = pid
                if done:
                    del self._killed[pid]
                    reaped = True
        return any(match(tag) for tag in self._killed.values())

    def finish_later(self, cage: Cage) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the watchdog or the next start's sweep finishes it

        async def finish() -> None:
            deadline = time.monotonic() + REAP_S
            while not cage.gone():
                if time.monotonic() > deadline:
                    log.warning("attempt cage %s: processes still alive after %.0f s",
                                cage.path or cage.tag, REAP_S)
                    return
                await asyncio.sleep(0.01)

        task = loop.create_task(finish())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    def close(self) -> None:
        """The worker stops: end every attempt's leftovers, stop the watchdog."""
        for task in self._later:
            task.cancel()
        if self.info.mechanism == "cgroup":
            for group in self._free:
                group.close()
            self._free.clear()
            kill_cgroup(self.info.where)
            remove_cgroup_tree(self.info.where, REAP_S)
            with contextlib.suppress(OSError):
                os.close(self._own)
        else:
            deadline = time.monotonic() + REAP_S
            while self.reap_tagged(lambda tag: tag.startswith(self.key + ":")):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        with contextlib.suppress(OSError):
            os.close(self._pipe)
        if self._watchdog is not None:
            try:
                self._watchdog.wait(REAP_S)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()


def start(mode: str | None = None) -> Containers:
    """Choose the mechanism, clear leftovers of dead workers, start the watchdog.

    `mode` "subreaper" forces the fallback; default: SWARM_CONTAINMENT, else automatic."""
    mode = mode or os.environ.get("SWARM_CONTAINMENT", "auto")
    # n: `swarm run` may hold several workers in one process, each contained on its own.
    key = f"{process_key(os.getpid())}-{next(_instances)}"
    info = _choose(mode, key)
    if info.mechanism == "subreaper":
        # Leftovers of workers that died with their watchdog: their tag names a dead key.
        stale = kill_tagged(all_pids(), lambda tag: not _key_alive(tag.split(":", 1)[0]))
        if stale:
            log.info("killed %d processes left by dead workers", len(stale))
        why = _set_child_subreaper()
        if why:
            log.warning("cannot become a child subreaper (%s): leftovers of an attempt "
                        "are found only while their parent lives", why)
    read, write = os.pipe()  # both close-on-exec: no backend inherits the write end
    target = ["--cgroup", info.where] if info.where else ["--tag", key]
    env = {k: v for k, v in os.environ.items() if k != TAG}
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    watchdog = subprocess.Popen(
        [sys.executable, "-c", "import sys; from swarm.backends.contain import watchdog; "
         "sys.exit(watchdog(sys.argv[1:]))", *target],
        stdin=read, stdout=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    os.close(read)
    return Containers(info, key, watchdog, write)


def _choose(mode: str, key: str) -> Containment:
    if mode == "subreaper":
        return Containment("subreaper", "", "", "SWARM_CONTAINMENT=subreaper")
    own, why = own_cgroup_dir()
    if not own:
        return Containment("subreaper", "", "", why)
    removed = sweep_cgroups(own)
    if removed:
        log.info("removed the cgroups of dead workers: %s", ", ".join(removed))
    where = os.path.join(own, PREFIX + key)
    try:
        os.mkdir(where)
    except OSError as e:
        return Containment("subreaper", "", "", f"cannot create a cgroup in {own}: "
                           f"{e.strerror or e}")
    why = _probe(where)
    if why:
        with contextlib.suppress(OSError):
            os.rmdir(where)
        return Containment("subreaper", "", "", why)
    kill = "cgroup.kill" if os.path.exists(os.path.join(where, "cgroup.kill")) else "freeze"
    return Containment("cgroup", where, kill, "")


# --- the watchdog -------------------------------------------------------------------------


def watchdog(argv: list[str]) -> int:
    """Wait for EOF on stdin (the worker is gone), then kill all it left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the worker
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    kind, target = argv[0], argv[1]
    if kind == "--cgroup":
        kill_cgroup(target)
        remove_cgroup_tree(target, REAP_S)
        return 0
    prefix = target + ":"
    deadline = time.monotonic() + REAP_S
    while kill_tagged(all_pids(), lambda tag: tag.startswith(prefix)):
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.01)
    return 0

