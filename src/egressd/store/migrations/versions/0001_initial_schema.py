"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "principals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_principals")),
        sa.UniqueConstraint("name", name=op.f("uq_principals_name")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("principal_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["principal_id"],
            ["principals.id"],
            name=op.f("fk_api_tokens_principal_id_principals"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "containers",
        sa.Column("id", sa.String(length=24), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("runtime", sa.String(length=16), nullable=False),
        sa.Column("ref", sa.String(length=256), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["principals.id"],
            name=op.f("fk_containers_owner_id_principals"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_containers")),
    )
    with op.batch_alter_table("containers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_containers_node"), ["node"], unique=False)

    op.create_table(
        "allocations",
        sa.Column("container_id", sa.String(length=24), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("subnet", sa.String(length=43), nullable=False),
        sa.Column("bridge_name", sa.String(length=15), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["container_id"],
            ["containers.id"],
            name=op.f("fk_allocations_container_id_containers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("container_id", name=op.f("pk_allocations")),
        sa.UniqueConstraint("node", "bridge_name", name="uq_allocations_node_bridge"),
        sa.UniqueConstraint("node", "subnet", name="uq_allocations_node_subnet"),
    )
    op.create_table(
        "network_configs",
        sa.Column("container_id", sa.String(length=24), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("proxy_url", sa.String(length=2048), nullable=True),
        sa.Column("proxy_username", sa.String(length=255), nullable=True),
        sa.Column("proxy_password", sa.String(length=255), nullable=True),
        sa.Column("country", sa.String(length=64), nullable=True),
        sa.Column("city", sa.String(length=64), nullable=True),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("dns_servers", sa.JSON(), nullable=False),
        sa.Column("desired_state", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("configured_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["container_id"],
            ["containers.id"],
            name=op.f("fk_network_configs_container_id_containers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("container_id", name=op.f("pk_network_configs")),
    )
    op.create_table(
        "network_status",
        sa.Column("container_id", sa.String(length=24), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("is_running", sa.Boolean(), nullable=False),
        sa.Column("observed_generation", sa.Integer(), nullable=False),
        sa.Column("last_check", sa.DateTime(timezone=True), nullable=True),
        sa.Column("applied", sa.JSON(), nullable=True),
        sa.Column("upstream", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["container_id"],
            ["containers.id"],
            name=op.f("fk_network_status_container_id_containers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("container_id", name=op.f("pk_network_status")),
    )


def downgrade() -> None:

    op.drop_table("network_status")
    op.drop_table("network_configs")
    op.drop_table("allocations")
    with op.batch_alter_table("containers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_containers_node"))

    op.drop_table("containers")
    op.drop_table("api_tokens")
    op.drop_table("principals")
