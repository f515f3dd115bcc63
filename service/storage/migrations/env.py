"""Alembic environment: always called through `service.storage.migrate`, which passes an open
connection (already inside the transaction that holds the migration lock)."""

from alembic import context

from service.storage.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through service.storage.migrate.upgrade(engine), "
                       "which passes the connection")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
