"""The one settings class. Only entry points (API app factory, Celery app, CLI, Alembic env) read it."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The starter encoder shipped in a source checkout (models/starter/encoder, trained by configs/train-starter.sh).
# An installed wheel has no models/ folder: there OMNIATTR_ENCODER_PATH or `omniattr init-encoder` is needed.
SHIPPED_ENCODER_PATH = Path(__file__).resolve().parent.parent / "models" / "starter" / "encoder"
# The starter generator shipped beside it (diffusers layout with attribute_adapter/); same rule: source checkout only.
SHIPPED_GENERATOR_PATH = Path(__file__).resolve().parent.parent / "models" / "starter" / "generator"


class Profile(StrEnum):
    """How omniattr is deployed."""

    embedded = "embedded"  # one process, no servers: SQLite + Qdrant Edge under data_dir, in-process worker
    server = "server"  # PostgreSQL + Qdrant server + a Celery broker, many workers


class Settings(BaseSettings):
    """Everything an entry point needs to wire the system; read from OMNIATTR_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="OMNIATTR_", env_file=".env", extra="ignore")

    profile: Profile = Profile.embedded
    data_dir: Path = Field(default=Path("./data"), description="Media, thumbnails, SQLite file, Edge shards.")

    # server profile
    database_url: str | None = Field(default=None, description="e.g. postgresql+psycopg://user@host/db")
    database_connect_timeout_s: int = Field(
        default=5, ge=1, description="PostgreSQL: longest wait to open a connection before a request fails (503)."
    )
    database_statement_timeout_s: float = Field(
        default=60.0, gt=0, description="PostgreSQL: longest run of one statement, lock waits included (then 503)."
    )
    qdrant_url: str | None = Field(default=None, description="e.g. http://qdrant:6333")
    qdrant_api_key: str | None = None
    broker_url: str | None = Field(default=None, description="e.g. redis://redis:6379/0")
    result_backend_url: str | None = None

    # shared
    allowed_roots: list[Path] = Field(default_factory=list, description="Directories ingest-from-path may read.")
    encoder_path: Path | None = Field(
        default=None,
        description=(
            "Encoder checkpoint dir; default: DATA_DIR/encoder if it exists, else the starter model shipped in "
            "a source checkout (models/starter/encoder)."
        ),
    )
    device: str = "auto"
    generator_path: Path | None = Field(
        default=None,
        description=(
            "Generator weights in diffusers format; default: the starter generator shipped in a source checkout "
            "(models/starter/generator) when present. Generations are off without one."
        ),
    )
    generations_enabled: bool = Field(
        default=True,
        description="false turns generations off (API 409, no Personalize on the page) whatever the generator path.",
    )
    generator_plugin: str = Field(default="flux", description="Entry point in the omniattr.generators group.")
    generation_steps: int = Field(default=28, ge=1, le=200)
    generation_size: int | None = Field(default=None, ge=16, le=4096, description="Output side; default: the model's.")
    index_batch_size: int = Field(default=32, ge=1, description="Images per encoder batch while indexing.")
    task_visibility_timeout_s: int = Field(
        default=1800,
        ge=1,
        description="A task unacknowledged this long (its worker died) is delivered again; "
        "must exceed the longest shard's run time.",
    )
    stale_shard_timeout_s: float = Field(
        default=1800,
        gt=0,
        description="An open shard untouched this long (never queued, or its worker was lost) is dispatched again "
        "by the API's sweeper; the embedded profile also resumes every open shard at start-up.",
    )
    stale_sweep_interval_s: float = Field(default=60, gt=0, description="How often the API looks for stale shards.")
    query_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for a query image's encoding.")
    disk_reserve_mb: int = Field(
        default=256,
        ge=0,
        description="Free space kept on the data directory's disk: a write that would go below it is refused (507).",
    )
    api_host: str = Field(
        default="127.0.0.1",
        description="Where `omniattr up` listens. Off loopback it needs API keys (OMNIATTR_REQUIRE_API_KEYS); on "
        "loopback only localhost Host headers are answered (DNS rebinding).",
    )
    api_port: int = 8000
    max_request_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, by Content-Length and on the received stream (chunked uploads).",
    )
    require_api_keys: bool | None = Field(
        default=None, description="Defaults to True in the server profile, False in the embedded one."
    )

    @model_validator(mode="after")
    def _check_profile(self) -> Settings:
        if self.profile is Profile.server:
            missing = [
                f"OMNIATTR_{name.upper()}"
                for name in ("database_url", "qdrant_url", "broker_url")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(
                    f"the server profile needs {', '.join(missing)}; set them, "
                    "or use OMNIATTR_PROFILE=embedded for a single process with no servers"
                )
        return self

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or a SQLite file under data_dir when embedded."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'omniattr.sqlite3').resolve()}"

    @property
    def default_encoder_path(self) -> Path:
        """Where `omniattr init-encoder` writes, and where an unset encoder_path looks."""
        return self.data_dir / "encoder"

    @property
    def resolved_encoder_path(self) -> Path | None:
        """The configured checkpoint, else DATA_DIR/encoder when it exists, else the shipped starter encoder."""
        if self.encoder_path is not None:
            return self.encoder_path
        if self.default_encoder_path.is_dir():
            return self.default_encoder_path
        return SHIPPED_ENCODER_PATH if (SHIPPED_ENCODER_PATH / "encoder_config.json").is_file() else None

    @property
    def resolved_generator_path(self) -> Path | None:
        """The generator generations use: None when switched off, else the configured one, else the shipped starter
        generator when its model_index.json exists (a source checkout), else None (generations off)."""
        if not self.generations_enabled:
            return None
        if self.generator_path is not None:
            return self.generator_path
        return SHIPPED_GENERATOR_PATH if (SHIPPED_GENERATOR_PATH / "model_index.json").is_file() else None

    @property
    def vectors_dir(self) -> Path:
        """Where the embedded vector index keeps its Qdrant Edge shards."""
        return self.data_dir / "vectors"

    @property
    def media_dir(self) -> Path:
        """Where originals (content-addressed) and thumbnails live."""
        return self.data_dir / "media"

    @property
    def api_keys_required(self) -> bool:
        """Whether requests must carry an API key."""
        if self.require_api_keys is not None:
            return self.require_api_keys
        return self.profile is Profile.server
