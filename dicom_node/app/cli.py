"""The ``dicom-node`` command line: serve, process, model check, echo, health, send, status,
retry, audit, conformance, console, train, evaluate."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from dicom_node import __version__
from dicom_node.common.errors import DicomNodeError
from dicom_node.common.log import configure_logging
from dicom_node.common.output_kinds import OutputKind
from dicom_node.config.checks import config_error
from dicom_node.config.destinations import DimseDestination
from dicom_node.config.settings import Settings, load_settings
from dicom_node.store.files import StorageLayout
from dicom_node.training.cli import add_crops_parser, add_evaluate_parser, add_train_parser

if TYPE_CHECKING:
    from dicom_node.audit.verify import Report
    from dicom_node.config.sections import Route

log = structlog.get_logger(__name__)

DEFAULT_CONFIG = Path("config/node.yaml")


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    configure_logging(settings.log_format, settings.log_level)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.app.node import Node
    from dicom_node.app.roles import default_role, parse_role

    role = parse_role(args.role) if args.role is not None else default_role()
    settings = _settings(args)
    node = Node(settings, role)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    if settings.log_format == "json":  # one JSON object per line on stderr, this one too
        log.info(
            "node.started",
            version=__version__,
            role=str(role),
            ae_title=settings.ae_title,
            port=settings.port if role.receives else None,
            storage_dir=str(settings.storage_dir),
        )
    else:
        doing = (
            f"listening as {settings.ae_title} on port {settings.port}"
            if role.receives
            else f"running as {role}"
        )
        print(
            f"dicom-node {__version__} ({role}) {doing}; storage in {settings.storage_dir}",
            file=sys.stderr,
            flush=True,
        )
    stop.wait()
    node.stop()
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    """Segment a folder of DICOM files, writing SEG + SR: no network.

    With ``--model`` every series runs on that package; else each series (and study) goes to
    the config's routes, as the node routes them (:mod:`dicom_node.app.process`), and each
    run names its route; a series no route takes is named too. A run that fails is named
    (Series Instance UID and file count) with the reason, and the others still run; a summary
    ends the run, and the exit status is 1 when any run failed (or a study route's case
    cannot run).
    """
    from dicom_node.app.process import plan_model, plan_routes
    from dicom_node.common.redact import describe
    from dicom_node.models.formats import load_model
    from dicom_node.models.inference import CaseSegmenter
    from dicom_node.work.segment import group_series, segment_case, segment_series, write_outputs

    configure_logging("console", "warning")
    segmenters: dict[Path, CaseSegmenter] = {}
    routes: tuple[Route, ...] = ()
    if args.model is not None:  # a package that does not load stops here, before any series
        segmenters[Path(args.model)] = load_model(Path(args.model))
    else:
        routes = load_settings(args.config).routes
        if not routes:
            raise DicomNodeError(f"{args.config}: no routes; give --model PACKAGE instead")
    groups = group_series(Path(args.input_dir))
    if not groups:
        raise DicomNodeError(f"{args.input_dir}: no DICOM files found")
    plan = plan_model(groups, Path(args.model)) if args.model else plan_routes(groups, routes)
    out = Path(args.output_dir)
    kinds = _output_kinds(args.outputs)
    failed = len(plan.not_runnable)
    for line in plan.not_runnable:
        print(f"{line}; not run", file=sys.stderr)
    for uid in plan.unrouted:
        print(f"series {uid} ({len(groups[uid])} file(s)): no route matches it", file=sys.stderr)
    for run in plan.runs:
        via = "" if run.route is None else f", route {run.route}"
        try:
            if run.model not in segmenters:
                segmenters[run.model] = load_model(run.model)
            segmenter = segmenters[run.model]
            if run.one_input:
                results = segment_series(next(iter(run.inputs.values())), segmenter, kinds)
            else:
                results = segment_case(run.inputs, segmenter, kinds)
            written = write_outputs(results, out)
        except Exception as exc:  # noqa: BLE001 - name the run, go on with the next one
            failed += 1
            print(f"{run.what} ({run.files} file(s)){via} failed: {describe(exc)}", file=sys.stderr)
            continue
        for item in written:
            print(item.path)
        made = ", ".join(f"{sum(w.kind == k for w in written)} {k.value}" for k in kinds)
        print(f"{run.what}{via}: {run.files} instance(s) -> {made}", file=sys.stderr)
    noun = "series" if args.model is not None else "run(s)"
    print(
        f"{len(plan.runs) + len(plan.not_runnable) - failed} {noun} ok, {failed} failed"
        + (" (reasons above)" if failed else "")
        + (f", {len(plan.unrouted)} series matched no route" if plan.unrouted else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def _output_kinds(text: str) -> list[OutputKind]:
    """``--outputs seg,sr,overlay`` as output kinds, refusing unknown ones."""
    allowed = ", ".join(k.value for k in OutputKind)
    kinds = []
    for item in (t.strip() for t in text.split(",")):
        if item not in {k.value for k in OutputKind}:
            raise DicomNodeError(f"--outputs: {item!r} is not an output kind; allowed: {allowed}")
        kinds.append(OutputKind(item))
    return kinds


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.send.senders.dimse import echo

    peer = f"C-ECHO {args.ae_title}@{args.host}:{args.port}"
    result = echo(
        args.host, args.port, args.ae_title, calling_ae=args.calling_ae, timeout_s=args.timeout
    )
    if result.status is None:
        print(f"{peer}: no association: {result.detail}", file=sys.stderr)
        return 1
    print(f"{peer}: status 0x{result.status:04X}")
    return 0 if result.status == 0 else 1


def cmd_health(args: argparse.Namespace) -> int:
    from dicom_node.app.health import check_health
    from dicom_node.app.roles import default_role, parse_role

    role = parse_role(args.role) if args.role is not None else default_role()
    health = check_health(load_settings(args.config), role, timeout_s=args.timeout)
    print(f"{'healthy' if health.healthy else 'unhealthy'}: {health.detail}")
    return 0 if health.healthy else 1


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node.send.senders.dimse import store_files

    paths = []
    for item in args.files:
        p = Path(item)
        paths.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    try:
        dest = DimseDestination(name="cli", ae_title=args.ae_title, host=args.host, port=args.port)
    except ValidationError as exc:
        raise config_error(exc) from None
    results = store_files(dest, paths, calling_ae=args.calling_ae)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"{r.path}: {r.detail}", file=sys.stderr)
    print(f"sent {len(results) - len(failed)} of {len(results)}")
    return 1 if failed else 0


def _layout(settings: Settings) -> StorageLayout:
    """Where the node of ``settings`` keeps its files (as :mod:`dicom_node.app.node` does)."""
    return StorageLayout.at(settings.storage_dir, settings.audit.key_file)


def _no_database_yet(settings: Settings) -> bool:
    """An SQLite node that has not run yet (a PostgreSQL database is asked directly)."""
    database_path = _layout(settings).database_path
    if settings.database is None and not database_path.exists():
        print(f"no database at {database_path}: the node has not run yet")
        return True
    return False


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.store.database import open_database
    from dicom_node.store.status import disk_space

    settings = load_settings(args.config)
    if _no_database_yet(settings):
        return 0
    db = open_database(settings.database, _layout(settings).database_path)
    try:
        status = db.status()
    finally:
        db.close()
    status["database"] = {"backend": db.backend, "location": db.location}
    status["disk"] = disk_space(settings.storage_dir, settings.limits.min_free_disk_bytes)
    status["configured_destinations"] = {
        name: d.address for name, d in settings.destinations.items()
    }
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"database: {db.backend} {db.location}")
    print(_disk_line(status["disk"]))
    print(f"instances indexed: {status['instances']}")
    for table in ("series", "cases", "jobs", "sends"):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(status[table].items())) or "none"
        print(f"{table}: {counts}")
    for name, addr in status["configured_destinations"].items():
        print(_destination_line(name, addr, status["destinations"].get(name, {})))
    for job in status["failed_jobs"]:
        print(
            f"failed job {job['id']} (route {job['route']}, {job['attempts']} attempts): "
            f"{job['error']}"
        )
    for case in status["failed_cases"]:
        print(f"failed case {case['id']} (route {case['route']}): {case['error']}")
    return 0


_SEND_COUNTS = ("pending", "done", "failed")


def _disk_line(disk: dict[str, Any]) -> str:
    """The ``disk:`` line of ``status``: free space on storage_dir against the mark."""
    from dicom_node.store.status import format_bytes

    line = (
        f"disk: {format_bytes(disk['free_bytes'])} free on {disk['storage_dir']}, "
        f"{format_bytes(disk['min_free_disk_bytes'])} needed (limits.min_free_disk_bytes)"
    )
    if disk["below_mark"]:
        line += (
            "; BELOW THE MARK: every C-STORE is refused (0xA700) until space is freed or "
            "limits.min_free_disk_bytes lowered"
        )
    return line


def _destination_line(name: str, addr: str, d: dict[str, object]) -> str:
    """One destination of ``status``: sends by state, when it is next tried, last error."""
    counts = ", ".join(f"{k} {d[k]}" for k in _SEND_COUNTS if k in d) or "idle"
    line = f"destination {name} ({addr}): {counts}"
    next_at = d.get("next_attempt_at")
    if isinstance(next_at, float):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(next_at))
        in_s = max(0.0, next_at - time.time())
        line += f"; next try {when} ({'now' if in_s < 0.5 else f'in {in_s:.0f} s'})"
    if "last_error" in d:
        line += f"; last error: {d['last_error']}"
    return line


def cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node.store.database import open_database

    settings = load_settings(args.config)
    if args.destination is not None and args.destination not in settings.destinations:
        known = ", ".join(sorted(settings.destinations)) or "none configured"
        raise DicomNodeError(f"--destination {args.destination!r}: unknown; known: {known}")
    if _no_database_yet(settings):
        return 0
    db = open_database(settings.database, _layout(settings).database_path)
    try:
        n = db.retry_failed_sends(args.destination)
        waiting = db.sends_due_now(args.destination) if args.now else 0
    finally:
        db.close()
    print(f"{n} failed send(s) queued again", end="")
    if args.now:
        print(f", {waiting} waiting send(s) made due now", end="")
    print("; a running node sends them within seconds")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check every record; print each failed check with its line (or seq) and reason.

    The chain the config uses (the database chain with PostgreSQL, ``audit.jsonl`` with
    SQLite), or with ``--file`` a JSON-lines file (``audit.jsonl`` or an ``audit export``).
    """
    from dicom_node.audit.chain import HEAD
    from dicom_node.audit.keys import load_key
    from dicom_node.audit.verify import verify, verify_database

    if args.file is not None and args.key is not None:
        # A file and its key: nothing of the node is needed (e.g. an auditor's copy).
        where, head = str(args.file), None
        key_file = args.key
        key = load_key(key_file, create=False)
        report = verify(args.file, key)
        return _print_report(report, where, key, key_file, head)
    settings = load_settings(args.config)
    layout = _layout(settings)
    key_file = args.key if args.key is not None else layout.audit_key_file
    key = load_key(key_file, create=False)
    head = None
    if args.file is not None:
        where = str(args.file)
        report = verify(args.file, key)
    elif settings.database is not None:
        from dicom_node.store.database import open_database

        where = "database audit chain"
        db = open_database(settings.database, layout.database_path)
        try:
            report = verify_database(db, key)
            head = db.audit_mark(HEAD)
        finally:
            db.close()
    else:
        from dicom_node.store.database import Database

        where = str(layout.audit_path)
        if layout.database_path.exists():
            db = Database(layout.database_path)
            try:
                head = db.audit_mark(HEAD)
            finally:
                db.close()
        report = verify(layout.audit_path, key, head, check_head=layout.database_path.exists())
    return _print_report(report, where, key, key_file, head)


def _print_report(
    report: Report, where: str, key: bytes | None, key_file: Path, head: tuple[int, str] | None
) -> int:
    """Each problem, the notes and a summary line; the exit status (1: any problem)."""
    for problem in report.problems:
        print(problem)
    for note in report.notes:
        print(f"note: {note}")
    if key is None:
        print(f"note: no key file at {key_file}: HMACs not checked")
    print(
        f"{where}: {report.records} record(s), {report.keyed} keyed, "
        + ("chain intact" if report.ok else f"{len(report.problems)} problem(s)")
        + (f", head at seq {head[0]}" if head else "")
    )
    return 0 if report.ok else 1


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Write the audit chain, up to its head now, as a JSON-lines file like ``audit.jsonl``.

    The file verifies with ``audit verify --file FILE`` and the key. It is written beside its
    final name and renamed when complete; an existing file is never overwritten.
    """
    from dicom_node.audit.archive import export_chain
    from dicom_node.store.database import open_database

    settings = load_settings(args.config)
    layout = _layout(settings)
    shared = settings.database is not None  # PostgreSQL: the database's chain
    exported = export_chain(
        Path(args.file),
        layout.audit_path,
        (lambda: open_database(settings.database, layout.database_path)) if shared else None,
    )
    print(
        f"{args.file}: {exported.records} record(s)"
        + (
            f", seq {exported.first}..{exported.last}, last hash {exported.last_hash}"
            if exported.records
            else ""
        )
        + f" (from the {exported.source}); check it with "
        f"`dicom-node audit verify --file {args.file}`"
    )
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    """Print the generated tables of the Conformance Statement, or fill them into a document."""
    from dicom_node.app import conformance

    configure_logging("console", "warning")
    blocks = conformance.render_blocks()
    if args.write is None:
        print(conformance.blocks_text(blocks), end="")
        return 0
    path = Path(args.write)
    try:
        text = conformance.fill(path.read_text(encoding="utf-8"), blocks)
    except (OSError, ValueError) as exc:
        raise DicomNodeError(f"{path}: {exc}") from None
    path.write_text(text, encoding="utf-8")
    print(f"{path}: {len(blocks)} generated blocks written", file=sys.stderr)
    return 0


def _read_password(confirm: bool) -> str:
    """The new password: typed twice at a terminal (not echoed), else one line of stdin."""
    import getpass

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != password:
        raise DicomNodeError("the two passwords differ; nothing changed")
    return password


def cmd_console_user(args: argparse.Namespace) -> int:
    """``console user add|remove|list``: the web console's local users (argon2 hashes)."""
    from dicom_node.config.sections import ConsoleRole
    from dicom_node.console.users import UserStore

    settings = load_settings(args.config)
    path = settings.console.users_file or _layout(settings).console_users_file
    users = UserStore(path)
    if args.user_command == "list":
        for user in users.users():
            print(f"{user.name} {user.role}")
        return 0
    if args.user_command == "remove":
        if not users.remove(args.name):
            raise DicomNodeError(f"no console user {args.name!r} in {path}")
        print(f"{args.name} removed from {path}; their session ends at their next request")
        return 0
    new = users.add(args.name, _read_password(confirm=True), ConsoleRole(args.role))
    print(f"{args.name} ({args.role}) {'added to' if new else 'updated in'} {path}")
    return 0


def cmd_model_check(args: argparse.Namespace) -> int:
    """Say what a model is (format, inputs, labels, spacing, device), run it once on a
    synthetic input, and list what a route still needs (:mod:`dicom_node.app.model_check`)."""
    import torch

    from dicom_node.app.model_check import check_model
    from dicom_node.models.inference import select_device

    configure_logging("console", "warning")
    device = select_device() if args.device == "auto" else torch.device(args.device)
    return check_model(Path(args.path), device, sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="DICOM node that segments incoming studies and sends back SEG + SR.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"node config YAML (default {DEFAULT_CONFIG})",
        )
        return p

    p = with_config(sub.add_parser("serve", help="run the node"))
    p.add_argument(
        "--role",
        help="the stages this process runs: all (default), receiver (DICOM port, assembly, "
        "retention), worker (models) or sender (delivery); receiver/worker/sender share a "
        "PostgreSQL database and storage_dir. Default: $DICOM_NODE_ROLE, else all",
    )
    p.set_defaults(func=cmd_serve)

    p = with_config(sub.add_parser("process", help="segment DICOM files from a folder, no network"))
    p.add_argument("input_dir")
    p.add_argument("output_dir")
    p.add_argument(
        "--model",
        help="run every series on this model (a package folder, bundle, nnU-Net folder or "
        "zip, TorchScript or ONNX file; default: route each series and study by the config's "
        "routes, as the node does)",
    )
    p.add_argument(
        "--outputs",
        default="seg,sr",
        help="comma-separated output kinds to write: seg, sr, overlay (default seg,sr)",
    )
    p.set_defaults(func=cmd_process)

    model = sub.add_parser("model", help="model tools")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    p = model_sub.add_parser(
        "check",
        help="say what a model is (package, TorchScript, ONNX, MONAI bundle, nnU-Net v2), run "
        "it once and list what a route still needs",
    )
    p.add_argument("path", help="what a route's model: would name (a folder or a file)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when available, default), cpu or cuda"
    )
    p.set_defaults(func=cmd_model_check)

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--ae-title", default="ANY-SCP", help="called AE title")
    p.add_argument("--calling-ae", default="DICOMNODE")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the connection, the association and the answer (default 10)",
    )
    p.set_defaults(func=cmd_echo)

    p = with_config(
        sub.add_parser(
            "health",
            help="is the node of this config up: C-ECHO to its own AE title and port (over "
            "TLS when set); roles without a DICOM port: their database opens. Exit 0 when healthy",
        )
    )
    p.add_argument("--role", help="the node's role (default: $DICOM_NODE_ROLE, else all)")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for the C-ECHO (default 10)"
    )
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("files", nargs="+")
    p.add_argument("--ae-title", default="ANY-SCP", help="called AE title")
    p.add_argument("--calling-ae", default="DICOMNODE")
    p.set_defaults(func=cmd_send)

    p = with_config(sub.add_parser("status", help="queue, jobs, failures and destinations"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = with_config(
        sub.add_parser(
            "retry",
            help="queue dead-lettered sends again; with --now also send waiting ones now",
        )
    )
    p.add_argument("--destination", help="only sends to this destination (default: all)")
    p.add_argument(
        "--now",
        action="store_true",
        help="also make sends that wait for their retry backoff due at once",
    )
    p.set_defaults(func=cmd_retry)

    audit = sub.add_parser("audit", help="audit trail tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    p = with_config(
        audit_sub.add_parser(
            "verify",
            help="check the audit chain the config uses (database or audit.jsonl), or --file",
        )
    )
    p.add_argument(
        "--file",
        type=Path,
        help="verify this JSON-lines file instead (audit.jsonl or a file of `audit export`)",
    )
    p.add_argument(
        "--key", type=Path, help="the HMAC key file (default: audit.key_file of the config)"
    )
    p.set_defaults(func=cmd_audit_verify)
    p = with_config(
        audit_sub.add_parser(
            "export", help="write the audit chain (up to its head now) to a new JSON-lines file"
        )
    )
    p.add_argument("file", help="the file to write (must not exist)")
    p.set_defaults(func=cmd_audit_export)

    p = sub.add_parser(
        "conformance",
        help="print the DICOM Conformance Statement's tables, generated from the code",
    )
    p.add_argument(
        "--write",
        metavar="PATH",
        help="replace the generated blocks of this document (docs/conformance.md) instead",
    )
    p.set_defaults(func=cmd_conformance)

    console = sub.add_parser("console", help="the web console's local users")
    console_sub = console.add_subparsers(dest="console_command", required=True)
    user = console_sub.add_parser("user", help="add, remove or list console users")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    p = with_config(
        user_sub.add_parser(
            "add",
            help="add a user (or set a new password and role); the password is read from a "
            "prompt, or one line of standard input, never from the command line",
        )
    )
    p.add_argument("name")
    p.add_argument(
        "--role",
        choices=["admin", "viewer"],
        default="viewer",
        help="viewer (default): read-only; admin: may also retry sends",
    )
    p.set_defaults(func=cmd_console_user)
    p = with_config(user_sub.add_parser("remove", help="remove a user"))
    p.add_argument("name")
    p.set_defaults(func=cmd_console_user)
    p = with_config(user_sub.add_parser("list", help="list the users and their roles"))
    p.set_defaults(func=cmd_console_user)

    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_crops_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
