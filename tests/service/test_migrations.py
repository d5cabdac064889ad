"""The schema exists only through Alembic: up, down and up again, on SQLite and PostgreSQL, and the
migrations match the tables the code declares."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shears.db.engine import make_engine
from shears.db.migrate import downgrade, upgrade
from shears.db.tables import Base

TABLES = {"models", "jobs", "job_layers", "job_events", "artifacts", "datasets"}


def check_round_trip(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"tables and migrations disagree: {diff}"
        downgrade(url)
        assert not (TABLES & set(inspect(engine).get_table_names()))
        upgrade(url)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_sqlite(tmp_path: Path) -> None:
    check_round_trip(f"sqlite:///{tmp_path / 'shears.db'}")


def test_postgresql(pg_database: str) -> None:
    check_round_trip(pg_database)


def test_constraints_are_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        fks = inspect(engine).get_foreign_keys("jobs")
        assert fks
        assert all((fk["name"] or "").startswith("fk_jobs_") for fk in fks)
    finally:
        engine.dispose()


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_has_a_named_primary_key(tmp_path: Path, table: str) -> None:
    url = f"sqlite:///{tmp_path / 'pk.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        assert inspect(engine).get_pk_constraint(table)["constrained_columns"]
    finally:
        engine.dispose()
