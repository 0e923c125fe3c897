"""Alembic environment: runs against the connection handed in by ``store.db.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from egressd.store.tables import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # command-line alembic: take the URL from the config
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
