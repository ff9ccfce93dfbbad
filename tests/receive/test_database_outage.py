"""PostgreSQL down under a running receiver: C-STOREs refused within
``limits.database_timeout_s`` (not the pool's 30 s), C-ECHO still answered, and stores resume
by themselves when the server is back. A failing database with a writable audit trail leaves
a Security Alert."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.app.node import Node
from dicom_node.app.roles import Role
from dicom_node.audit.file_chain import read_events
from dicom_node.common.errors import DicomNodeError
from dicom_node.common.status import StoreStatus
from dicom_node.config.settings import parse_settings
from tests.conftest import free_port, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.postgres import PostgresServer, require_postgres
from tests.receive.peers import ct_instance, echo, running_receiver, store_association

#: limits.database_timeout_s in these tests, and the bound a refusal must come within on a
#: loaded machine (the wait, then the refusal's own work).
TIMEOUT_S = 2.0
REFUSED_WITHIN_S = 15.0


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own: it is stopped and started again."""
    server = PostgresServer(require_postgres()).start()
    try:
        yield server
    finally:
        server.stop()


def database_events(node: Node) -> list[str]:
    from dicom_node.audit.database_chain import DatabaseChain

    chain = node.audit.chain
    assert isinstance(chain, DatabaseChain)
    return [e["event_id"]["meaning"] for e in chain.events()]


def indexed_count(node: object) -> int:
    rows = node.db._query("SELECT COUNT(*) AS n FROM instances")  # type: ignore[attr-defined]
    return int(rows[0]["n"])


def test_a_database_outage_is_refused_within_database_timeout_s(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    settings = parse_settings(
        {
            "ae_title": "DICOMNODE",
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "node"),
            "database": own_postgres.create_database(),
            "limits": {"database_timeout_s": TIMEOUT_S},
        },
        base=tmp_path,
    )
    node = Node(settings, Role.RECEIVER)
    node.start()
    port = settings.port
    files = write_files(ct_series(n_slices=3, rows=16, cols=16), tmp_path / "ct")
    try:
        assert storescu(port, files[:1]).returncode == 0
        # An association that was audited before the outage.
        assoc = store_association(port)
        assert assoc.is_established
        wait_for(
            lambda: database_events(node).count("User Authentication") >= 2,
            10,
            "the association's User Authentication record",
        )
        own_postgres.halt("fast")

        start = time.monotonic()
        rsp = assoc.send_c_store(ct_instance())
        refused_s = time.monotonic() - start
        assert rsp.Status == StoreStatus.OUT_OF_RESOURCES
        assert rsp.ErrorComment == "cannot write the audit trail"  # no record, no access
        assert TIMEOUT_S * 0.9 <= refused_s < REFUSED_WITHIN_S, refused_s
        assoc.release()

        # A new sender: its association cannot be audited, so it is aborted as quickly.
        start = time.monotonic()
        done = storescu(port, files[1:2])
        refused_s = time.monotonic() - start
        assert done.returncode != 0 and "aborted" in (done.stdout + done.stderr).lower()
        assert refused_s < REFUSED_WITHIN_S, refused_s
        print(f"refusals with the database down and database_timeout_s {TIMEOUT_S}: ok")

        # C-ECHO moves no data: still answered.
        e = echo(port, "127.0.0.2")
        assert e.is_established and e.send_c_echo().Status == 0
        e.release()

        own_postgres.resume()

        def stored() -> bool:
            done = storescu(port, files[1:], "-v")
            return done.returncode == 0 and "Refused" not in done.stdout + done.stderr

        wait_for(stored, 60, "C-STORE accepted again once the database is back")
        assert indexed_count(node) == 3
    finally:
        if not (own_postgres.data_dir / "postmaster.pid").exists():
            own_postgres.resume()
        node.stop()


def test_a_failing_database_with_a_writable_audit_leaves_a_security_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_receiver(tmp_path) as node:

        def down(**_: object) -> None:
            raise DicomNodeError("database postgresql://db/node: no connection within 2 s")

        monkeypatch.setattr(node.db, "record_instance", down)
        assoc = store_association(node.settings.port)
        statuses = [assoc.send_c_store(ct_instance()) for _ in range(2)]
        assoc.release()
        assert [r.Status for r in statuses] == [StoreStatus.OUT_OF_RESOURCES] * 2
        assert statuses[0].ErrorComment == "cannot index the instance now"
        assert node.audit.path is not None
        alerts = [
            e for e in read_events(node.audit.path) if e["event_id"]["meaning"] == "Security Alert"
        ]
        assert len(alerts) == 1  # once per association
        assert alerts[0]["details"]["reason"] == (
            "C-STORE refused: the node database failed (DicomNodeError)"
        )
        assert indexed_count(node) == 0
