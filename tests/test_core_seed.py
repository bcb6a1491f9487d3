from __future__ import annotations

import pytest
import sqlalchemy as sa

from maxtwo_cli.core import db, schema
from maxtwo_cli.core import seed as seed_module
from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.errors import AlreadySeededError, SchemaMismatchError
from maxtwo_cli.core.query import query_users
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.schema import users
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.helpers import distinct_updated_at, points_histogram, state, user_rows


def test_seed_inserts_count_users_at_zero_points(engine):
    result = seed_users(engine, 10_000)
    assert result.rows == 10_000
    assert points_histogram(engine) == {0: 10_000}
    rows = user_rows(engine)
    assert [row.id for row in rows] == list(range(1, 10_001))
    assert len(distinct_updated_at(engine)) == 1
    assert rows[0].inserted_at == rows[0].updated_at
    assert rows[0].inserted_at.tzinfo is not None


def test_seed_spans_several_batches_in_one_transaction(engine, monkeypatch):
    monkeypatch.setattr(seed_module, "SEED_BATCH_SIZE", 300)
    progress = []
    seed_users(engine, 1_000, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(300, 1000), (600, 1000), (900, 1000), (1000, 1000)]
    assert [row.id for row in user_rows(engine)] == list(range(1, 1_001))


def test_seed_refuses_existing_users_without_reset(engine):
    seed_users(engine, 100)
    before = state(engine)
    with pytest.raises(AlreadySeededError, match="--reset"):
        seed_users(engine, 50)
    assert len(user_rows(engine)) == 100
    assert state(engine).epoch == before.epoch


def test_reset_replaces_users_and_forgets_the_query_state(engine):
    seed_users(engine, 500)
    randomize_points(engine)
    query_users(engine)
    before = state(engine)
    assert before.last_query_at is not None

    seed_users(engine, 200, reset=True)

    after = state(engine)
    assert after.epoch > before.epoch
    assert after.last_query_at is None
    assert points_histogram(engine) == {0: 200}
    assert [row.id for row in user_rows(engine)] == list(range(1, 201))
    assert query_users(engine).previous is None


def test_reset_draws_a_new_max_number(engine):
    seed_users(engine, 10)
    # 1 in 101 chance each time to draw the same number again; eight resets never all do.
    drawn = {state(engine).max_number}
    for _ in range(8):
        seed_users(engine, 10, reset=True)
        drawn.add(state(engine).max_number)
    assert len(drawn) > 1


def test_seed_count_zero_is_valid(engine):
    result = seed_users(engine, 0)
    assert result.rows == 0
    assert user_rows(engine) == []
    # An empty table may be seeded later.
    seed_users(engine, 5)
    assert len(user_rows(engine)) == 5


def test_seed_advances_the_epoch(engine):
    before = state(engine).epoch
    seed_users(engine, 10)
    assert state(engine).epoch == before + 1


def test_negative_count_is_rejected(engine):
    with pytest.raises(ValueError):
        seed_users(engine, -1)


def test_ids_continue_after_a_seed(engine):
    """The identity sequence is moved past the seeded ids, so a later plain insert works."""
    seed_users(engine, 10)
    with engine.begin() as conn:
        new_id = conn.scalar(
            users.insert().values(inserted_at=utcnow(), updated_at=utcnow()).returning(users.c.id)
        )
    assert new_id == 11


def interrupt(done: int, total: int) -> None:
    raise RuntimeError("interrupted")


def test_a_failed_seed_leaves_the_users_and_the_table_as_they_were(engine):
    seed_users(engine, 500)
    before = state(engine)
    with pytest.raises(RuntimeError, match="interrupted"):
        seed_users(engine, 1_000, reset=True, on_progress=interrupt)
    assert [row.id for row in user_rows(engine)] == list(range(1, 501))
    assert state(engine) == before
    seed_users(engine, 300, reset=True)  # the table still works as before
    assert [row.id for row in user_rows(engine)] == list(range(1, 301))


@pytest.mark.parametrize(
    "id_column",
    [
        "id INTEGER PRIMARY KEY AUTOINCREMENT",  # goes on after the largest id it ever held
        "id BIGINT NOT NULL PRIMARY KEY",  # no rowid alias: SQLite gives no id at all
    ],
)
def test_a_users_table_that_does_not_number_from_1_is_not_seeded(tmp_path, id_column):
    # SQLite numbers the seeded rows itself; a table that is not maxtwo's (same columns) may not.
    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'other.db'}"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                f"CREATE TABLE users ({id_column}, points SMALLINT NOT NULL, "
                "inserted_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)"
            ))
            conn.execute(sa.text("INSERT INTO users VALUES (5, 0, 0, 0)"))
        schema.ensure_schema(engine)
        before = state(engine)
        with pytest.raises(SchemaMismatchError, match="not maxtwo's: it refused new users or did not number them 1, 2, 3"):
            seed_users(engine, 3, reset=True)
        assert [row.id for row in user_rows(engine)] == [5]
        assert state(engine) == before
    finally:
        engine.dispose()


def test_postgres_bulk_load_leaves_the_table_definition_as_it_was(postgres_engine):
    # The load drops the primary key and gives the timestamps defaults for its own length;
    # afterwards (committed or not) the table must be exactly maxtwo's again.
    def definition() -> tuple:
        with postgres_engine.connect() as conn:
            constraints = conn.execute(sa.text(
                "SELECT conname, contype FROM pg_constraint WHERE conrelid = 'users'::regclass ORDER BY 1"
            )).all()
            defaults = conn.execute(sa.text(
                "SELECT column_name, column_default FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'users' ORDER BY 1"
            )).all()
            options = conn.scalar(sa.text("SELECT reloptions FROM pg_class WHERE oid = 'users'::regclass"))
        return constraints, defaults, options

    original = definition()
    assert ("users_pkey", "p") in original[0] and original[2] == ["fillfactor=50"]
    seed_users(postgres_engine, 2_000)
    assert definition() == original
    with pytest.raises(RuntimeError, match="interrupted"):
        seed_users(postgres_engine, 2_000, reset=True, on_progress=interrupt)
    assert definition() == original
