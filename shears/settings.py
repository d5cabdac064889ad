"""The one typed settings object for the API, the worker and the CLI (``SHEARS_`` environment)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, computed_field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.allocator import DEFAULT_MMAP_THRESHOLD


class Settings(BaseSettings):
    """Service configuration. Every field reads ``SHEARS_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="SHEARS_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".shears"),
        description="Root of everything the embedded default keeps: SQLite files and artifacts.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; unset: SQLite.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker, e.g. redis://host:6379/0. Unset: kombu's SQLAlchemy "
        "transport on a SQLite file in data_dir (no server).",
    )
    storage_dir: Path | None = Field(
        default=None, description="Where models and artifacts live. Unset: data_dir/storage."
    )
    port: int = Field(default=8000, description="Port of the API that `make run` starts.")
    host: str = Field(default="127.0.0.1", description="Interface the API listens on.")
    max_upload_bytes: int = Field(
        default=4 * 1024**3, gt=0, description="Largest accepted upload; bigger ones get 413."
    )
    queue: str = Field(default="shears", description="Celery queue the jobs travel on.")
    job_lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A running job whose worker has not renewed its lease for this long is taken "
        "over by the next delivery.",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="A job that has been claimed this many times fails instead."
    )
    sweep_interval_seconds: float = Field(
        default=15.0, gt=0, description="How often the sweeper looks for lost or stalled jobs."
    )
    requeue_after_seconds: float = Field(
        default=600.0,
        gt=0,
        description="A queued job whose message reached the broker this long ago is published "
        "again (in case the message was lost); duplicates are harmless, the claim refuses them.",
    )
    job_time_limit_seconds: int = Field(
        default=24 * 3600, gt=0, description="Hard limit on one job; the soft limit is 95% of it."
    )
    latency_batch_size: int = Field(
        default=32, gt=0, description="Batch size at which latency before/after is measured."
    )
    latency_warmup: int = Field(default=3, ge=0, description="Untimed runs before measuring.")
    latency_repeats: int = Field(
        default=10, ge=1, description="Timed runs; the median is reported."
    )
    malloc_mmap_threshold_bytes: int = Field(
        default=0,
        ge=0,
        description=(
            "Worker, glibc only: allocations of at least this many bytes are mapped and go back "
            "to the OS when freed, so a pruning job's peak memory is what it holds, not what "
            f"earlier forwards freed. {DEFAULT_MMAP_THRESHOLD} (4 MiB) took SparseGPT at 1 B "
            "widths from ~315 to ~272 MiB extra for 3% more time, but CPU fine-tuning 30% "
            "slower. 0 (default): the allocator's own policy."
        ),
    )
    train_device: str | None = Field(
        default=None,
        description="Where fine-tuning and evaluation run, e.g. `cuda:1`; default CUDA when the "
        "worker has it (bf16 autocast), else the CPU.",
    )
    checkpoint_every_steps: int = Field(
        default=200,
        ge=1,
        description="Fine-tuning saves a checkpoint this often (optimizer steps); a redelivered "
        "job resumes from it.",
    )
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="'tenant:key,tenant2:key2'. With any key (here or from `shears keys create`), "
        "every /v1 route needs `Authorization: Bearer <key>`; with none the service is open.",
    )
    max_queued_jobs_per_tenant: int = Field(
        default=100, ge=1, description="More queued jobs than this for one tenant get 429."
    )
    storage_quota_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Most bytes Shears keeps in storage (models, artifacts); unset: no quota.",
    )
    events_poll_seconds: float = Field(
        default=0.5,
        ge=0.05,
        le=10.0,
        description="How often an open event stream (GET /v1/jobs/{id}/events as "
        "text/event-stream) reads the job's new events and progress from the database.",
    )
    events_keepalive_seconds: float = Field(
        default=15.0,
        gt=0,
        le=300.0,
        description="An event stream with nothing to send writes a comment this often, so that "
        "proxies keep the connection open.",
    )
    log_level: str = Field(default="INFO", description="Log level of API and worker (JSON logs).")
    notify_queue: str = Field(
        default="shears-notify",
        description="Celery queue of notifications (webhook deliveries, job event listeners), "
        "served by a worker of its own so that none waits behind a pruning job.",
    )
    notify_concurrency: int = Field(
        default=8,
        ge=1,
        description="Threads of the notify worker (deliveries wait on the network).",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Allow webhook URLs on loopback, private and link-local addresses "
        "(development and tests only: it opens the service to SSRF).",
    )
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0),
        description="Seconds before each retry of a failed webhook delivery, comma-separated "
        "(each gets +-20% jitter); one attempt plus one retry per entry.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Whole-attempt limit of one webhook delivery."
    )
    webhook_max_response_bytes: int = Field(
        default=64 * 1024, ge=0, description="Most of a webhook response body that is read."
    )

    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server, e.g. http://mlflow:5000. Set: every finished job is "
        "logged as a run (params, metrics, tags, model and report). Unset: nothing is logged.",
    )
    mlflow_experiment: str = Field(
        default="shears", description="MLflow experiment the runs are logged to."
    )
    mlflow_retry_seconds: float = Field(
        default=30.0,
        gt=0,
        description="First wait before logging a run again when the tracking server is "
        "unreachable; each retry doubles it, up to mlflow_retry_max_seconds.",
    )
    mlflow_retry_max_seconds: float = Field(
        default=3600.0, gt=0, description="Longest wait between two tries to log a run."
    )
    mlflow_max_retries: int = Field(
        default=48,
        ge=0,
        description="Tries after the first before a run is given up (the job's events say so).",
    )

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in value):
            raise ValueError("retry delays are seconds >= 0")
        return value

    # -- scale-out: object storage, the worker's read cache, the GPU queue ---------------------
    storage_url: str | None = Field(
        default=None,
        description="Where models, datasets, checkpoints and artifacts live: s3://bucket/prefix "
        "for any S3-compatible server; unset: local disk (storage_dir).",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="The S3-compatible server (MinIO, moto...); unset: AWS. Credentials come "
        "the usual boto3 way (AWS_ACCESS_KEY_ID..., a profile, an instance role).",
    )
    s3_presign: bool = Field(
        default=False,
        description="Answer an artifact download with 307 to a presigned URL instead of "
        "streaming it through the API.",
    )
    s3_presign_seconds: int = Field(
        default=900, gt=0, le=7 * 24 * 3600, description="How long a presigned URL stays valid."
    )
    cache_dir: Path | None = Field(
        default=None,
        description="The worker's read cache and local scratch with object storage; unset: "
        "~/.cache/shears. Never under data_dir.",
    )
    cache_max_bytes: int = Field(
        default=50 * 1024**3,
        gt=0,
        description="Size bound of the read cache; least recently used objects are evicted.",
    )
    progress_every_seconds: float = Field(
        default=0.5,
        gt=0,
        description="Least time between two progress writes of a running job (stage changes "
        "are written at once): the main database write rate of a fleet of workers.",
    )
    gpu_queue: str = Field(
        default="shears-gpu",
        description="Queue of jobs that fine-tune or prune an hf model, while a GPU worker is "
        "alive (a heartbeat within the lease); they go to `queue` otherwise.",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'shears.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "storage").resolve()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or Path.home() / ".cache" / "shears").resolve()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
