"""SQLAlchemy tables of the metadata store. Never serialised directly: the API has its own schemas."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from omniattr.domain import (
    MAX_ATTRIBUTE_CHARS,
    MAX_NAME_CHARS,
    GenerationStatus,
    ImageStatus,
    IndexStatus,
    JobStatus,
    ShardStatus,
)

# Named constraints keep Alembic migrations identical on PostgreSQL and SQLite (batch mode needs names).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Portable server-side default (PostgreSQL and SQLite both know CURRENT_TIMESTAMP).
CURRENT_TIMESTAMP = text("CURRENT_TIMESTAMP")

# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """Timezone-aware now, for Python-side defaults."""
    return datetime.now(UTC)


def _one_of(column: str, values: type[StrEnum]) -> str:
    """A CHECK that `column` holds one of the enum's values, e.g. "status IN ('pending', 'ready', 'failed')"."""
    return f"{column} IN ({', '.join(repr(member.value) for member in values)})"


class Base(DeclarativeBase):
    """Declarative base with the project's constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=CURRENT_TIMESTAMP, default=utcnow
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=CURRENT_TIMESTAMP, default=utcnow, onupdate=utcnow
    )


class ProgressMixin:
    """Counters of a unit of work (a job, or one of its shards); each declares its status with its own enum."""

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Collection(TimestampMixin, Base):
    """A named set of images that is searched together."""

    __tablename__ = "collections"
    # Ids are never reused (SQLite reuses the highest deleted rowid without AUTOINCREMENT; PostgreSQL
    # sequences never do): a vector left behind by a deleted collection or image can never be taken for a
    # new one's.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")

    images: Mapped[list[Image]] = relationship(back_populates="collection", passive_deletes=True)


class Image(TimestampMixin, Base):
    """One image file of a collection; unique by content hash within its collection."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("collection_id", "sha256", name="uq_images_collection_sha256"),
        CheckConstraint(_one_of("status", ImageStatus), name="status"),
        Index("ix_images_collection_status", "collection_id", "status"),
        {"sqlite_autoincrement": True},  # ids never reused, like the collections'
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(Text)  # original path or upload file name
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), default=ImageStatus.PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)

    collection: Mapped[Collection] = relationship(back_populates="images")


class Attribute(Base):
    """A normalised attribute text ("lighting", "art style"); shared by all collections."""

    __tablename__ = "attributes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(MAX_ATTRIBUTE_CHARS), unique=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=CURRENT_TIMESTAMP, default=utcnow
    )


class EncoderModel(Base):
    """A registered encoder checkpoint; its version names the vector collection its vectors live in."""

    __tablename__ = "encoder_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(100), unique=True)
    backend: Mapped[str] = mapped_column(String(32))
    dimension: Mapped[int] = mapped_column(Integer)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=CURRENT_TIMESTAMP, default=utcnow
    )


class CollectionAttribute(TimestampMixin, Base):
    """An attribute indexed (or being indexed) for a collection under one encoder version."""

    __tablename__ = "collection_attributes"
    __table_args__ = (
        UniqueConstraint("collection_id", "attribute_id", "encoder_model_id", name="uq_collection_attributes_triple"),
        CheckConstraint(_one_of("status", IndexStatus), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    attribute_id: Mapped[int] = mapped_column(ForeignKey("attributes.id", ondelete="CASCADE"))
    encoder_model_id: Mapped[int] = mapped_column(ForeignKey("encoder_models.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=IndexStatus.INDEXING)

    attribute: Mapped[Attribute] = relationship()


class Job(ProgressMixin, TimestampMixin, Base):
    """Long work (ingest, index, backfill, generate) with progress that can be read at any time."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("status", JobStatus), name="status"),
        Index("ix_jobs_collection_status", "collection_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    collection_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    encoder_model_id: Mapped[int | None] = mapped_column(ForeignKey("encoder_models.id", ondelete="SET NULL"))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING)

    shards: Mapped[list[JobShard]] = relationship(
        back_populates="job", order_by="JobShard.position", passive_deletes=True
    )


class JobShard(ProgressMixin, TimestampMixin, Base):
    """A few minutes of a job's work: a fixed list of image ids, done all or retried."""

    __tablename__ = "job_shards"
    __table_args__ = (
        UniqueConstraint("job_id", "position", name="uq_job_shards_job_position"),
        CheckConstraint(_one_of("status", ShardStatus), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    items: Mapped[list[Any]] = mapped_column(JSONType, default=list)  # image ids, or paths for ingest
    status: Mapped[str] = mapped_column(String(16), default=ShardStatus.PENDING)

    job: Mapped[Job] = relationship(back_populates="shards")


class Generation(TimestampMixin, Base):
    """A personalize or compose request, its output image and its attribute-transfer scores."""

    __tablename__ = "generations"
    __table_args__ = (CheckConstraint(_one_of("status", GenerationStatus), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default=GenerationStatus.PENDING)
    output_path: Mapped[str | None] = mapped_column(Text)
    transfer_scores: Mapped[dict[str, float]] = mapped_column(JSONType, default=dict)
    error: Mapped[str | None] = mapped_column(Text)


class ApiKey(Base):
    """An API key; only its SHA-256 is stored, the plaintext is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=CURRENT_TIMESTAMP, default=utcnow
    )
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
