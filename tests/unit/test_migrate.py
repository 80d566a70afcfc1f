import sqlite3

import pytest

from appliance.common.resources import migrations_dir
from appliance.storage.migrate import SchemaError, applied_migrations, migrate


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
