import multiprocessing
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance.common.resources import migrations_dir
from appliance.storage import pg
from appliance.storage.migrate import (
    POSTGRES_DIR,
    SchemaError,
    applied_migrations,
    known_migrations,
    migrate,
    postgres_sql,
)
from tests.support.engines import Engine, create_database


def test_migrations_apply_once(tmp_path):
    db = tmp_path / "appliance.db"
    first = migrate(db, migrations_dir())
    assert first[0] == "0001_init.sql"
    assert migrate(db, migrations_dir()) == []
    assert applied_migrations(db) == first
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 0


def test_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "appliance.db"
    migrate(db, migrations_dir())
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO _migrations VALUES ('9999_from_the_future.sql', 'now')")
    conn.commit()
    with pytest.raises(SchemaError, match="newer version"):
        migrate(db, migrations_dir())


# ------------------------------------------------------------------------------------------ PostgreSQL


@pytest.fixture
def pg_url(postgres_engine: Engine) -> str:
    return create_database(postgres_engine, f"m_{uuid.uuid4().hex[:16]}")


def test_every_migration_has_a_postgres_form_and_overrides_name_real_migrations() -> None:
    known = {path.name for path in known_migrations(migrations_dir())}
    overrides = {path.name for path in (migrations_dir() / POSTGRES_DIR).glob("*.sql")}
    assert overrides <= known
    for path in known_migrations(migrations_dir()):
        sql = postgres_sql(path)
        code = _code(sql)
        assert code.strip() and "WITHOUT ROWID" not in code and "randomblob" not in code, path.name
        assert not re.search(r"\b(REAL|BLOB|INTEGER)\b", code), path.name


def _code(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def test_postgres_migrates_from_empty_once_with_the_sqlite_schema(pg_url: str, tmp_path: Path) -> None:
    assert pg.applied_migrations(pg_url) == []
    first = pg.migrate(pg_url, migrations_dir())
    assert first == [path.name for path in known_migrations(migrations_dir())]
    assert pg.migrate(pg_url, migrations_dir()) == []
    assert pg.applied_migrations(pg_url) == first
    # the same tables and columns as SQLite's
    migrate(tmp_path / "a.db", migrations_dir())
    lite = sqlite3.connect(tmp_path / "a.db")
    tables = [row[0] for row in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    conn = pg.connect_sync(pg_url)
    try:
        for table in tables:
            ours = {row[1] for row in lite.execute(f"PRAGMA table_info({table})")}
            theirs = {row[0] for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))}
            assert ours == theirs, table
    finally:
        conn.close()


def test_postgres_refuses_a_newer_schema(pg_url: str) -> None:
    pg.migrate(pg_url, migrations_dir())
    conn = pg.connect_sync(pg_url)
    conn.execute("INSERT INTO _migrations VALUES ('9999_from_the_future.sql', 'now')")
    conn.close()
    with pytest.raises(SchemaError, match="newer version"):
        pg.migrate(pg_url, migrations_dir())


def _migrate_in_process(url: str, out: Any) -> None:
    out.put(pg.migrate(url, migrations_dir()))


def test_two_nodes_starting_together_migrate_once(pg_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_process, args=(pg_url, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    names = [path.name for path in known_migrations(migrations_dir())]
    assert sorted(results, key=len) == [[], names]  # one applied all, the other found nothing left
    assert pg.applied_migrations(pg_url) == names


def test_postgres_errors_are_schema_errors(postgres_engine: Engine) -> None:
    missing = postgres_engine.url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(SchemaError, match="no_such_database"):
        pg.migrate(missing, migrations_dir())
