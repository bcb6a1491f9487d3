"""Small helpers shared by tests: direct SQL for checking what the core did."""

from __future__ import annotations

import sqlalchemy as sa

from maxtwo_cli.core.schema import query_state, randomizer_state, users


def points_histogram(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(users.c.points, sa.func.count()).group_by(users.c.points)
        ).all()
    return {points: count for points, count in rows}


def state(engine: sa.Engine) -> sa.Row:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(
                randomizer_state.c.epoch,
                randomizer_state.c.max_number,
                randomizer_state.c.randomized_at,
                query_state.c.last_query_at,
            ).join_from(randomizer_state, query_state, randomizer_state.c.id == query_state.c.id)
        ).one()


def user_rows(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.select(users).order_by(users.c.id)).all()


def distinct_updated_at(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(users.c.updated_at).distinct()))


def set_max_number(engine: sa.Engine, value: int) -> None:
    with engine.begin() as conn:
        conn.execute(randomizer_state.update().values(max_number=value))
