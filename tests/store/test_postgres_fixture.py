"""The PostgreSQL fixtures themselves: a real server, one fresh database per test."""

from __future__ import annotations

import psycopg


def test_each_test_gets_an_empty_database_of_its_own(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        version = conn.execute("SHOW server_version").fetchone()
    assert tables == (0,)
    assert version is not None and int(str(version[0]).split(".")[0]) >= 15


def test_database_url_is_none_for_sqlite_or_a_url(database_url: str | None) -> None:
    assert database_url is None or database_url.startswith("postgresql://")
