"""Several receiver processes behind one port (``receivers: N``), supervised by the node.

One Python process reaches about one core while it receives (the interpreter lock): with
``receivers`` above 1, the node starts that many child processes that each run a
:class:`~dicom_node.receive.receiver.Receiver`. The node's process listens on the port and
accepts; it hands each connection (``SCM_RIGHTS`` over a Unix socket pair) to the child with
the fewest open connections. (``SO_REUSEPORT``, one listening socket per child, was the other
way: the kernel then deals connections by a hash of their addresses whether that child is busy
or not - four senders all landed on one of two children in a trial -, drops what waits in the
queue of a child that dies, and lets any process of the same user join the port.) Only
receiving is multiplied: assembly, retention, workers and delivery stay in the node's own
process, which a child wakes when an association that stored instances ends.

What stays one across the children:

- the limits: a small arbiter in the parent (:class:`Arbiter`) counts every open connection
  and admitted association of every child. A connection is counted before it is handed over
  (``max_connections``, ``max_associations_per_peer`` per host; beyond, it is closed at once);
  a child asks it before it admits an association (``max_associations`` with
  ``reserved_associations``, ``max_associations_per_peer`` per calling AE title; beyond,
  A-ASSOCIATE-RJ), so the node refuses exactly as one process does wherever the connection
  went. The counts of a child that dies are released when its socket to the parent closes.
- the audit chain: the children append to the same chain (the file under a ``flock``,
  :mod:`dicom_node.audit.file_chain`; or PostgreSQL's table under the head-row lock).
- the state: the children index into the node database (SQLite in WAL mode, or PostgreSQL);
  ``dicom-node status`` reads it.
- the metrics: each child reports its receive counters and step times to the parent
  (:class:`ForwardedMetrics`), which counts them in the node's (``metrics_port``).

The parent restarts a child that exits unexpectedly (after :data:`RESTART_DELAY_S`); on stop
it stops accepting, ends each child's handoff and sends it SIGTERM: the child serves what was
handed over, lets its associations finish (at most :data:`DRAIN_S`) and exits. The children
are killed with the node's process (``PR_SET_PDEATHSIG``): a ``kill -9`` of the node ends all
of it, as it did one process.

A child is ``python -c`` :data:`CHILD_COMMAND` ``FD HANDOFF_FD PARENT_PID``: it reads its
:class:`ChildSpec` (pickled) on stdin, talks to the arbiter over the socket ``FD`` in JSON
lines and receives its connections on ``HANDOFF_FD``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog

from dicom_node.common.errors import StartupError
from dicom_node.common.metrics import NodeMetrics
from dicom_node.config.sections import Limits
from dicom_node.receive import incoming
from dicom_node.receive.limits import Admission, LimitedServer
from dicom_node.receive.receiver import Receiver, ReceiverSettings
from dicom_node.store.files import SHARED_STALE_TEMP_S

log = structlog.get_logger(__name__)

#: Seconds a child has to listen after it started (imports, database, audit chain).
START_TIMEOUT_S = 60.0
#: Seconds a stopping child lets its associations finish before it exits.
DRAIN_S = 20.0
#: Seconds between a child's unexpected exit and its restart.
RESTART_DELAY_S = 1.0
#: prctl option: the signal a process gets when the thread that started it ends (Linux).
PR_SET_PDEATHSIG = 1
#: Seconds between two looks of the supervisor at its children (and of a child at its parent).
WATCH_S = 0.2


#: What a child process runs (``python -c``), with the socket to the parent as argument.
CHILD_COMMAND = (
    "import sys; from dicom_node.app.receivers import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class ChildSpec:
    """What a receiver child needs: its settings, the database and the audit chain."""

    receiver: ReceiverSettings
    #: The ``database:`` URL (PostgreSQL), or None for SQLite at ``database_path``.
    database: str | None
    database_path: Path
    database_timeout_s: float
    audit_path: Path
    audit_key_file: Path
    log_format: str
    log_level: str
    #: Which child (0 .. receivers - 1), for the logs.
    index: int = 0


# -- the arbiter (parent) ---------------------------------------------------------------------


class _Ticket:
    """One admitted association of a child, as the parent's :class:`Admission` counts it."""


class Arbiter:
    """The counts of every child's connections and associations, under the node's limits.

    Parameters
    ----------
    limits
        The node's limits (the same for the whole node as for one process).
    allowed_callers
        Calling AE titles that may use the reserved associations.
    """

    def __init__(self, limits: Limits, allowed_callers: tuple[str, ...]) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._per_host: Counter[str] = Counter()
        self._admission = Admission(limits, allowed_callers)
        #: child -> its open connections by host, its admitted associations by key
        self._connections: dict[int, Counter[str]] = {}
        self._tickets: dict[int, dict[int, _Ticket]] = {}

    def take_connection(self, children: list[int], host: str) -> tuple[int | None, str]:
        """Count a connection from ``host`` for the one of ``children`` with the fewest open
        connections; that child, or None and why the connection is refused."""
        with self._lock:
            if sum(self._per_host.values()) >= self.limits.max_connections:
                return None, "limits.max_connections reached"
            if self._per_host[host] >= self.limits.max_associations_per_peer:
                return None, "limits.max_associations_per_peer reached for this host"
            child = min(children, key=lambda c: sum(self._connections.get(c, Counter()).values()))
            self._per_host[host] += 1
            self._connections.setdefault(child, Counter())[host] += 1
            return child, ""

    def free_connection(self, child: int, host: str) -> None:
        with self._lock:
            mine = self._connections.get(child)
            if mine is None or mine[host] <= 0:
                return
            mine[host] -= 1
            self._per_host[host] -= 1
            if not mine[host]:
                del mine[host]
            if not self._per_host[host]:
                del self._per_host[host]

    def admit(
        self, child: int, key: int, host: str, calling_ae: str, echo_only: bool
    ) -> str | None:
        """Admit an association of ``child``; None, or why it does not fit."""
        ticket = _Ticket()
        with self._lock:
            reason = self._admission.admit(ticket, host, calling_ae, echo_only)  # type: ignore[arg-type]
            if reason is None:
                self._tickets.setdefault(child, {})[key] = ticket
            return reason

    def release(self, child: int, key: int) -> None:
        with self._lock:
            ticket = self._tickets.get(child, {}).pop(key, None)
            if ticket is not None:
                self._admission.release(ticket)  # type: ignore[arg-type]

    def forget(self, child: int) -> None:
        """Release everything ``child`` held (it exited)."""
        with self._lock:
            for host, n in self._connections.pop(child, Counter()).items():
                self._per_host[host] -= n
                if self._per_host[host] <= 0:
                    del self._per_host[host]
            for ticket in self._tickets.pop(child, {}).values():
                self._admission.release(ticket)  # type: ignore[arg-type]

    def connections(self) -> dict[int, dict[str, int]]:
        """child -> host -> open connections, now."""
        with self._lock:
            return {child: dict(c) for child, c in self._connections.items() if c}

    @property
    def admitted(self) -> int:
        return self._admission.admitted


@dataclass
class _Child:
    index: int
    #: Unique for the pool's life (a restarted child gets a new one): the arbiter's key.
    key: int
    proc: subprocess.Popen[bytes]
    #: Requests of the child, answered by the arbiter (JSON lines).
    sock: socket.socket
    #: Connections handed to the child (SCM_RIGHTS).
    handoff: socket.socket
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    failure: str | None = None
    failure_errno: int | None = None


class ReceiverPool:
    """``count`` receiver processes behind one listening socket, the arbiter, the supervisor.

    Parameters
    ----------
    spec
        What each child runs (its ``index`` is set per child).
    count
        How many children.
    on_release
        Set when a child reports the end of an association that stored instances.
    metrics
        Where the children's receive metrics are counted (the node's).
    """

    def __init__(
        self,
        spec: ChildSpec,
        count: int,
        on_release: threading.Event | None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.count = count
        self.on_release = on_release
        self.metrics = metrics
        settings = spec.receiver
        # The children share incoming/: each removes only old files there at its start; what
        # a killed node left there is removed once, here (see incoming.clean).
        self._stale_incoming_s = SHARED_STALE_TEMP_S if settings.shared_storage else 0.0
        self.spec = dataclasses.replace(
            spec, receiver=dataclasses.replace(settings, shared_storage=True)
        )
        self.arbiter = Arbiter(settings.limits, settings.allowed_callers)
        self._children: dict[int, _Child] = {}  # index -> the running child
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        #: Set when the children have exited: the supervisor thread, which starts restarted
        #: children, must outlive them (their PR_SET_PDEATHSIG follows that thread).
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        #: Children restarted after an unexpected exit, since start.
        self.restarts = 0
        #: Associations each child (by index) admitted, since start.
        self.served: Counter[int] = Counter()

    # -- start and stop --------------------------------------------------------------------

    def start(self) -> None:
        """Listen, start the children and return once every one serves.

        Raises
        ------
        OSError
            The port cannot be listened on (taken, privileged, not an address of this host).
        StartupError
            A child did not start; its reason.
        """
        settings = self.spec.receiver
        family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((settings.bind_address, settings.port))
        except OSError:
            listener.close()
            raise
        listener.settimeout(WATCH_S)  # the accept loop looks at _stopping between accepts
        self._listener = listener
        stale = incoming.clean(settings.incoming_dir, self._stale_incoming_s)
        if stale:
            log.info("receiver.stale_incoming_removed", files=stale)
        for index in range(self.count):
            self._spawn(index)
        try:
            for index in range(self.count):
                self._wait_ready(self._children[index])
        except BaseException:
            self.stop()
            raise
        listener.listen(LimitedServer.request_queue_size)
        for name, target in (("receiver-accept", self._accept), ("receivers", self._supervise)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("receivers.started", receivers=self.count, pids=self.pids(), port=settings.port)

    def _wait_ready(self, child: _Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not child.ready.wait(WATCH_S):
            if child.failure is not None or child.proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise StartupError(
                    f"receivers: receiver process {child.index} did not start within "
                    f"{START_TIMEOUT_S:.0f} s; see its log lines above, or set receivers: 1"
                )
        if child.failure is not None:
            raise StartupError(f"receivers: receiver process {child.index}: {child.failure}")
        if not child.ready.is_set():
            raise StartupError(
                f"receivers: receiver process {child.index} exited with "
                f"{child.proc.returncode} at start; see its log lines above"
            )

    def _spawn(self, index: int) -> _Child:
        parent_end, child_end = socket.socketpair()
        handoff, child_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = [child_end.fileno(), child_handoff.fileno()]
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_COMMAND, *map(str, fds), str(os.getpid())],
            stdin=subprocess.PIPE,
            pass_fds=fds,
        )
        child_end.close()
        child_handoff.close()
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(dataclasses.replace(self.spec, index=index)))
        proc.stdin.close()
        child = _Child(index, next(self._keys), proc, parent_end, handoff)
        with self._lock:
            self._children[index] = child
        threading.Thread(
            target=self._serve, args=(child,), name=f"arbiter-{index}", daemon=True
        ).start()
        return child

    def stop(self) -> None:
        """Stop accepting; SIGTERM every child: each lets its associations end, then exits."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()  # new connections are refused from now on
            self._listener = None
        for thread in self._threads[:1]:  # the accept loop
            thread.join(timeout=5)
        with self._lock:
            children = list(self._children.values())
        for child in children:
            # Nothing more to hand over: the child takes what is queued, then sees the end.
            with contextlib.suppress(OSError):
                child.handoff.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.proc.wait(timeout=DRAIN_S + 10)
            except subprocess.TimeoutExpired:
                log.error("receiver.killed", receiver=child.index, pid=child.proc.pid)
                child.proc.kill()
                child.proc.wait()
            child.sock.close()
            child.handoff.close()
        self._stopped.set()
        for thread in self._threads[1:]:
            thread.join(timeout=5)
        log.info("receivers.stopped", served=[self.served[i] for i in range(self.count)])

    def pids(self) -> list[int]:
        """The children's process ids, by index."""
        with self._lock:
            return [self._children[i].proc.pid for i in sorted(self._children)]

    # -- accepting -------------------------------------------------------------------------

    def _accept(self) -> None:
        """Accept each connection, count it, hand it to the child with the fewest open."""
        while not self._stopping.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                conn, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("connection.accept_failed", error=exc.strerror)
                time.sleep(0.05)  # e.g. out of file descriptors: let some close
                continue
            with conn:
                self._hand_over(conn, address)

    def _hand_over(self, conn: socket.socket, address: Any) -> None:
        host = str(address[0])
        with self._lock:
            live = [c for c in self._children.values() if c.ready.is_set()]
        if not live:
            log.warning("connection.refused", peer=host, reason="no receiver process running")
            return
        keys = [c.key for c in live]
        key, reason = self.arbiter.take_connection(keys, host)
        if key is None:
            log.warning("connection.refused", peer=host, reason=reason)
            return
        child = next(c for c in live if c.key == key)
        try:
            socket.send_fds(child.handoff, [json.dumps(list(address)).encode()], [conn.fileno()])
        except OSError as exc:  # the child just died: the peer sees the connection close
            self.arbiter.free_connection(key, host)
            log.warning("connection.handoff_failed", receiver=child.index, error=exc.strerror)

    # -- supervision -----------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._restart_exited()
        finally:
            self._stopped.wait()

    def _restart_exited(self) -> None:
        while not self._stopping.wait(WATCH_S):
            with self._lock:
                dead = [c for c in self._children.values() if c.proc.poll() is not None]
            for child in dead:
                if self._stopping.is_set():
                    return
                log.error(
                    "receiver.exited",
                    receiver=child.index,
                    pid=child.proc.pid,
                    returncode=child.proc.returncode,
                    hint="restarted; its associations were cut, their senders may resend",
                )
                child.ready.clear()
                child.sock.close()
                child.handoff.close()
                self.arbiter.forget(child.key)
                if self._stopping.wait(RESTART_DELAY_S):
                    return
                fresh = self._spawn(child.index)
                self.restarts += 1
                try:
                    self._wait_ready(fresh)
                except (OSError, StartupError) as exc:
                    log.error("receiver.restart_failed", receiver=child.index, error=str(exc))

    # -- the arbiter's side of one child's socket ------------------------------------------

    def _serve(self, child: _Child) -> None:
        """Answer one child's requests until its socket closes; then release its counts."""
        arbiter = self.arbiter
        try:
            for line in child.sock.makefile("rb"):
                msg = json.loads(line)
                op = msg["op"]
                if op == "admit":
                    reply = arbiter.admit(
                        child.key, msg["key"], msg["host"], msg["ae"], msg["echo"]
                    )
                    if reply is None:
                        self.served[child.index] += 1
                    child.sock.sendall(json.dumps(reply).encode() + b"\n")
                elif op == "free":
                    arbiter.free_connection(child.key, msg["host"])
                elif op == "release":
                    arbiter.release(child.key, msg["key"])
                elif op == "released":
                    if self.on_release is not None:
                        self.on_release.set()
                elif op == "metrics":
                    if self.metrics is not None:
                        count_forwarded(self.metrics, msg["samples"])
                elif op == "ready":
                    child.ready.set()
                elif op == "failed":
                    child.failure = str(msg["error"])
        except (OSError, ValueError, KeyError):
            pass
        finally:
            child.ready.clear()
            arbiter.forget(child.key)


# -- the child --------------------------------------------------------------------------------


class ArbiterClient:
    """A child's side of its socket to the parent: one request at a time, answered in order."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._lock = threading.Lock()
        #: Set when the parent cannot be reached (the child then stops).
        self.lost = threading.Event()

    def tell(self, **msg: Any) -> None:
        """Send ``msg`` (no answer)."""
        with self._lock:
            self._send(msg)

    def ask(self, **msg: Any) -> str | None:
        """Send ``msg`` and return the answer (None: allowed; else why not)."""
        with self._lock:
            self._send(msg)
            if self.lost.is_set():
                return "the node's parent process is gone"
            line = self._reader.readline()
        if not line:
            self.lost.set()
            return "the node's parent process is gone"
        answer = json.loads(line)
        return None if answer is None else str(answer)

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            self.lost.set()


class SharedLimitedServer(LimitedServer):
    """A :class:`LimitedServer` that listens on no port: the parent accepts each connection
    and hands it over (:meth:`take_over`); its end is told to the parent's :class:`Arbiter`.
    """

    arbiter: ArbiterClient

    def server_bind(self) -> None:
        """Bind nothing: the socket the server selects on is one end of a pair that is never
        written (``serve_forever`` then only looks for shutdown)."""
        assert self.socket is not None
        self.socket.close()
        self.socket, self._other_end = socket.socketpair()

    def server_activate(self) -> None:
        """Nothing: the parent listens."""

    def server_close(self) -> None:
        assert self.socket is not None
        self.socket.close()
        self._other_end.close()

    def take_over(self, conn: socket.socket, address: tuple[str, int]) -> None:
        """Serve ``conn``, a connection the parent accepted (and counted), on its own thread."""
        conn.settimeout(self.limits.idle_timeout_s)
        if super().verify_request(conn, address):  # this process's count, for its drain
            self.process_request(conn, address)
            return
        self.arbiter.tell(op="free", host=address[0])
        with contextlib.suppress(OSError):
            conn.close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.arbiter.tell(op="free", host=str(client_address[0]))


def _take_connections(server: SharedLimitedServer, handoff: socket.socket) -> None:
    """Serve the connections the parent hands over on ``handoff`` until it closes."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(handoff, 1024, 1)
        except OSError:
            return
        if not data and not fds:
            return
        for fd in fds:
            conn = socket.socket(fileno=fd)
            host, port = json.loads(data)[:2]
            server.take_over(conn, (str(host), int(port)))


class SharedAdmission(Admission):
    """An :class:`Admission` that admits only what the parent's :class:`Arbiter` admits."""

    def __init__(
        self, limits: Limits, known_callers: tuple[str, ...], arbiter: ArbiterClient
    ) -> None:
        super().__init__(limits, known_callers)
        self.arbiter = arbiter

    def admit(self, assoc: Any, host: str, calling_ae: str, echo_only: bool) -> str | None:
        reason = super().admit(assoc, host, calling_ae, echo_only)
        if reason is not None:
            return reason
        reason = self.arbiter.ask(
            op="admit", key=id(assoc), host=host, ae=calling_ae, echo=echo_only
        )
        if reason is not None:
            super().release(assoc)
        return reason

    def release(self, assoc: Any) -> None:
        with self._lock:
            mine = id(assoc) in self._admitted
        super().release(assoc)
        if mine:
            self.arbiter.tell(op="release", key=id(assoc))


#: Seconds between two reports of a child's metrics to the parent.
METRICS_EVERY_S = 0.25


class _Forwarded:
    """One metric of :class:`ForwardedMetrics` (or one of its label sets)."""

    def __init__(self, owner: ForwardedMetrics, name: str, labels: tuple[str, ...] = ()) -> None:
        self._owner, self._name, self._labels = owner, name, labels

    def labels(self, *values: str) -> _Forwarded:
        return _Forwarded(self._owner, self._name, values)

    def inc(self, amount: float = 1.0) -> None:
        self._owner.add(self._name, self._labels, amount)

    def observe(self, value: float) -> None:
        self._owner.add(self._name, self._labels, value)


class ForwardedMetrics:
    """The receiver's metrics in a child: reported to the parent, which counts them in its
    :class:`~dicom_node.common.metrics.NodeMetrics` (served on ``metrics_port``) every
    :data:`METRICS_EVERY_S` and at the child's stop."""

    #: The metrics the receiver counts (the attributes of NodeMetrics it uses).
    NAMES = ("associations", "instances_received", "instances_refused", "receive_step_seconds")

    def __init__(self, arbiter: ArbiterClient) -> None:
        self._arbiter = arbiter
        self._lock = threading.Lock()
        self._pending: list[tuple[str, tuple[str, ...], float]] = []
        for name in self.NAMES:
            setattr(self, name, _Forwarded(self, name))

    def add(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._pending.append((name, labels, value))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            self._arbiter.tell(op="metrics", samples=pending)


def count_forwarded(metrics: NodeMetrics, samples: list[Any]) -> None:
    """Count a child's reported ``samples`` in the parent's ``metrics``."""
    for name, labels, value in samples:
        if name not in ForwardedMetrics.NAMES:
            continue
        metric = getattr(metrics, name)
        if labels:
            metric = metric.labels(*labels)
        if name.endswith("_seconds"):
            metric.observe(float(value))
        else:
            metric.inc(float(value))


class _ReleaseSignal(threading.Event):
    """The receiver's ``on_release``: tells the parent (its scheduler) at once, after the
    metrics of the association (its instances are counted when the sender is done)."""

    def __init__(self, arbiter: ArbiterClient, metrics: ForwardedMetrics) -> None:
        super().__init__()
        self._arbiter = arbiter
        self._metrics = metrics

    def set(self) -> None:
        self._metrics.flush()
        self._arbiter.tell(op="released")


def _server_class(arbiter: ArbiterClient) -> type[SharedLimitedServer]:
    """A :class:`SharedLimitedServer` that tells ``arbiter`` (set before it serves)."""

    class Server(SharedLimitedServer):
        pass

    Server.arbiter = arbiter
    return Server


def _die_with(parent: int) -> None:
    """Be killed with the node's process (Linux ``PR_SET_PDEATHSIG``): the node is one unit,
    as one process was; a child that outlived it would write beside the node started next."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before that
        os._exit(1)


def run_child(spec: ChildSpec, sock: socket.socket, handoff: socket.socket, parent: int) -> int:
    """Run one receiver child until SIGTERM, or until its parent is gone; its exit code."""
    from dicom_node.audit.log import open_audit_log
    from dicom_node.common.log import configure_logging
    from dicom_node.store.database import open_database

    configure_logging(spec.log_format, spec.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its children
    _die_with(parent)
    arbiter = ArbiterClient(sock)
    try:
        db = open_database(spec.database, spec.database_path, spec.database_timeout_s)
        audit = open_audit_log(db, audit_path=spec.audit_path, key_file=spec.audit_key_file)
        metrics = ForwardedMetrics(arbiter)
        receiver = Receiver(
            spec.receiver,
            db,
            audit,
            on_release=_ReleaseSignal(arbiter, metrics),
            metrics=cast(NodeMetrics, metrics),
        )
        receiver.server_class = _server_class(arbiter)
        receiver.admission = SharedAdmission(
            spec.receiver.limits, spec.receiver.allowed_callers, arbiter
        )
        server = receiver.start()
    except OSError as exc:
        arbiter.tell(op="failed", error=exc.strerror or str(exc), errno=exc.errno)
        return 1
    except Exception as exc:  # noqa: BLE001 - the parent reports it and stops
        arbiter.tell(op="failed", error=str(exc))
        return 1
    assert isinstance(server, SharedLimitedServer)
    taking = threading.Thread(
        target=_take_connections, args=(server, handoff), name="handoff", daemon=True
    )
    taking.start()
    arbiter.tell(op="ready", pid=os.getpid())
    log.info("receiver.process_listening", receiver=spec.index, pid=os.getpid())
    while not stop.wait(METRICS_EVERY_S):
        metrics.flush()
        if arbiter.lost.is_set() or os.getppid() != parent:
            log.error("receiver.parent_gone", receiver=spec.index)
            break
    # The parent stopped accepting and ended the handoff: take what it handed over already.
    taking.join(timeout=5)
    with contextlib.suppress(OSError):
        handoff.shutdown(socket.SHUT_RDWR)
    receiver.stop()  # the associations in progress go on
    deadline = time.monotonic() + DRAIN_S
    while server.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.open_connections:
        log.warning("receiver.drain_timeout", open_connections=server.open_connections)
    metrics.flush()
    db.close()
    log.info("receiver.process_stopped", receiver=spec.index, pid=os.getpid())
    return 0


def main(argv: list[str]) -> int:
    """A child's entry (:data:`CHILD_COMMAND` ``FD HANDOFF_FD PARENT_PID``); the spec comes on
    stdin."""
    spec = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 - written by the parent
    if not isinstance(spec, ChildSpec):
        print("receivers: expected a ChildSpec on stdin", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[0]))
    return run_child(spec, sock, socket.socket(fileno=int(argv[1])), int(argv[2]))
