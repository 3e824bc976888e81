"""The one settings object of stemgen, read from the environment (and an optional `.env` file).

Every field maps to an environment variable named in upper case (``broker_url`` ← ``BROKER_URL``);
`.env.example` lists them all with their defaults. Packages receive a `Settings` instance (or the
values they need from it); nothing reads ``os.environ`` elsewhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
)

STEM_NAMES = ("guitar", "bass", "drums")


class Settings(BaseSettings):
    """Configuration of the gateway and the workers. Units are in the field names."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- broker / result backend / job store -------------------------------------------------------
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Queue of the generate_stem tasks (GPU/CPU workers) and of finalize/callback delivery.
    stems_queue: str = "stems"
    callbacks_queue: str = "callbacks"
    #: Celery result backend, also the job store (job records, idempotency keys). Must be Redis.
    result_backend: str = "redis://127.0.0.1:6379/1"
    #: Seconds a job record and its results are kept.
    job_ttl_seconds: int = 7 * 24 * 3600
    #: Broker visibility timeout (Redis/SQS): must exceed the longest task, or a task still running
    #: is delivered a second time. Set with GENERATION_DEADLINE_SECONDS and
    #: WORKER_GRACE_PERIOD_SECONDS (docs/operations.md "Deadline, visibility timeout, grace period").
    visibility_timeout_seconds: int = 2 * 3600
    #: The watchdog of a generation call (stems.batching.GenerationDeadline): at most this long
    #: (seconds; also the deadline of a call before any was measured), else
    #: GENERATION_DEADLINE_MIN_SECONDS + GENERATION_DEADLINE_SLACK x the measured seconds per
    #: second of audio x the call's duration. A call past it fails its stems; the worker then
    #: reports not-ready and exits non-zero. Must be below VISIBILITY_TIMEOUT_SECONDS and at most
    #: WORKER_GRACE_PERIOD_SECONDS.
    generation_deadline_seconds: float = Field(default=1800.0, gt=0)
    generation_deadline_min_seconds: float = Field(default=60.0, gt=0)
    generation_deadline_slack: float = Field(default=4.0, ge=1)
    #: Seconds a worker is given between SIGTERM and SIGKILL (Kubernetes
    #: terminationGracePeriodSeconds, compose stop_grace_period): its warm shutdown lets running
    #: generations finish, so it is at least GENERATION_DEADLINE_SECONDS.
    worker_grace_period_seconds: int = Field(default=7500, gt=0)
    #: The outbox dispatcher (tasks.dispatcher), run by each worker unless turned off: how often
    #: an idle dispatcher looks for new jobs, most jobs per look, how long a claimed job is leased
    #: to one dispatcher (it is claimed again after that if its dispatcher died), and how long a
    #: job whose chord could not be sent (broker down) waits before the next try.
    dispatcher_enabled: bool = True
    dispatcher_poll_seconds: float = Field(default=0.1, gt=0, le=10)
    dispatcher_batch_size: int = Field(default=100, ge=1, le=10_000)
    dispatcher_lease_seconds: float = Field(default=30.0, gt=0)
    dispatcher_retry_seconds: float = Field(default=5.0, gt=0)
    #: The dispatcher sends a callback delivery again when it is still pending this long after its
    #: attempt was due (its Celery message presumed lost; tasks.dispatcher). Longer than a delivery
    #: task may wait for a free worker thread; a copy of a delivery that was not lost is harmless.
    delivery_sweep_grace_seconds: float = Field(default=300.0, gt=0)

    # --- model -----------------------------------------------------------------------------------
    #: Hub id (facebook/musicgen-small, facebook/musicgen-melody), a local checkpoint directory, or
    #: "tiny" / "tiny-melody" (random weights,
    #: made on the fly; for tests and offline runs).
    musicgen_model: str = "facebook/musicgen-small"
    #: The models this deployment serves, comma-separated (e.g.
    #: "facebook/musicgen-small,facebook/musicgen-melody"); the first is the default of
    #: ``parameters.model``. Each model has its own Celery queue (``stems_queue_for``) and its own
    #: workers, each started with MUSICGEN_MODEL set to the model it holds. Empty: MUSICGEN_MODEL only.
    musicgen_models: str = ""
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    stemgen_device: str = "auto"
    #: Load the model, run a short warm-up generation and render one synthetic stem (librosa's
    #: lazy imports, numba compilation) when a worker process starts.
    preload_model: bool = True
    #: Dynamic batching (stems.batching): most clips per MusicGen call, how long the first request
    #: of a batch waits for company, and the duration granularity of a batch. 6: two 3-stem
    #: requests in one call; on a 2-core CPU in bfloat16 a step of 6 rows costs 1.3x a step of 3,
    #: one of 12 twice that (docs/benchmarks.md#precision).
    batch_max_size: int = Field(default=6, ge=1, le=64)
    batch_window_seconds: float = Field(default=0.05, ge=0, le=5)
    batch_bucket_seconds: float = Field(default=1.0, gt=0)
    #: Threads of a worker process (Celery threads pool); each runs one stem task, and the stem
    #: tasks of a worker share one model and one batcher. At least batch_max_size.
    worker_concurrency: int = Field(default=6, ge=1, le=256)
    #: Intra-op threads torch uses while generating (torch.set_num_threads); 0: all cores the
    #: process sees on CPU, 1 on CUDA (the GPU does the arithmetic; the host only launches work).
    #: Set it to the container's CPU limit on CPU workers.
    torch_num_threads: int = Field(default=0, ge=0, le=1024)
    #: How tokens are decoded (stems.decoding): "auto" (CUDA graphs on CUDA, audiocraft's eager
    #: generate on CPU), "eager" (audiocraft, the reference), "exact" (static key/value cache,
    #: bitwise the same tokens as eager), "static" (batch padded to a bucket, fixed shapes),
    #: "graph" (static steps replayed as CUDA graphs captured at worker start; CUDA only).
    engine_mode: Literal["auto", "eager", "exact", "static", "graph"] = "auto"
    #: The language model's precision layout (stems.precision, docs/decoding.md#precision): "auto"
    #: (float16 on CUDA; bfloat16 on a CPU with native bfloat16, else float32), "float32",
    #: "float16", "bfloat16", "int8" (CPU only: int8 weight-only layers).
    engine_precision: Literal["auto", "float32", "float16", "bfloat16", "int8"] = "auto"
    #: File the worker writes once its model is loaded and passed its start self-check (removed
    #: when it stops); the k8s and compose probes test for it.
    worker_ready_file: str = "/tmp/stemgen-worker-ready"
    #: How often (seconds) a generating stem task looks whether its job was cancelled
    #: (DELETE /jobs/<id>); the batch drops the row at its next decoding step after that.
    cancel_poll_seconds: float = Field(default=0.5, gt=0, le=10)
    #: audiocraft's attention implementation: "torch" (PyTorch scaled_dot_product_attention, which
    #: picks flash/memory-efficient kernels on CUDA) or "xformers" (needs a working xformers build;
    #: CUDA only).
    attention_backend: Literal["torch", "xformers"] = "torch"
    #: Sampling defaults (audiocraft's own defaults); requests may override them.
    default_top_k: int = 250
    default_top_p: float = 0.0
    default_temperature: float = 1.0
    default_cfg_coef: float = 3.0

    # --- musical plan, ensemble generation, source audio -------------------------------------------
    #: Demucs model that separates an ensemble generation into stems (demucs.pretrained name;
    #: htdemucs_6s has drums, bass and guitar sources; "tiny": random weights, offline). Loaded on
    #: the first ensemble request.
    separation_model: str = "htdemucs_6s"
    #: Demucs ``shifts`` (random-shift averaging; 0 = one pass) and ``overlap`` between segments.
    separation_shifts: int = Field(default=0, ge=0, le=10)
    separation_overlap: float = Field(default=0.25, ge=0, lt=1)
    #: A separated stem whose level is this far (dB) below the mix is reported as nearly silent
    #: (``silent: true`` and a warning in its result) and is not gained up to the loudness target.
    separation_silent_stem_db: float = Field(default=-35.0, le=0)
    #: Where source audio for ``condition_on_audio`` lives: blob ``audio_file_id`` in this container.
    source_audio_container: str = "audio-files"
    #: Largest source file fetched (bytes) and longest source decoded (seconds).
    source_audio_max_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    source_audio_max_seconds: float = Field(default=600.0, gt=0)
    #: With source_mode "continue": seconds of the song before the region that MusicGen continues
    #: (generate_continuation).
    source_prompt_seconds: float = Field(default=4.0, gt=0, le=20)

    # --- request limits -------------------------------------------------------------------------
    #: Longest stem a request may ask for (seconds). Beyond the model's window (30 s for the hub
    #: MusicGens) audiocraft extends the clip window by window (docs/architecture.md#long-stems).
    max_duration_seconds: float = 120.0
    max_request_bytes: int = 64 * 1024
    #: A body over MAX_REQUEST_BYTES is read and discarded up to this many bytes and seconds before
    #: the 413 is sent, so that clients which send the whole body first still see the answer.
    request_drain_bytes: int = Field(default=32 * 1024 * 1024, ge=0)
    request_drain_seconds: float = Field(default=10.0, ge=0)

    # --- audio -----------------------------------------------------------------------------------
    beats_per_bar: int = 4
    target_lufs: float = -14.0
    max_true_peak_dbtp: float = -1.0

    # --- storage -----------------------------------------------------------------------------------
    azure_storage_connection_string: str = AZURITE_CONNECTION_STRING
    azure_storage_container: str = "stems"
    #: Lifetime of the read SAS in stem URLs.
    sas_ttl_seconds: int = 24 * 3600
    #: Attempts of the Azure SDK's ExponentialRetry policy (waits 2 + 2**n s) per storage call.
    storage_retry_total: int = 6
    #: Connect and read timeout of each storage HTTP request, seconds.
    storage_timeout_seconds: float = 20.0

    #: A rendered stem whose upload meets unreachable storage is kept in the job store's Redis, so
    #: that the task's retry (on any worker) uploads it without generating it again: at most this
    #: many bytes per stem (a larger file is not kept; its retry generates again) and for this long
    #: (seconds; longer than the storage retries' waits). 0 = nothing kept.
    staged_stem_max_bytes: int = Field(default=48 * 1024 * 1024, ge=0)
    staged_stem_ttl_seconds: int = Field(default=3600, ge=0)

    # --- callback -------------------------------------------------------------------------------------
    #: Used when a request names no callback_url; empty = no callback for such requests.
    default_callback_url: str = ""
    #: HMAC-SHA256 key for the X-Stemgen-Signature header; empty = unsigned.
    callback_secret: str = ""
    #: TCP connect timeout of one delivery attempt, seconds.
    callback_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    #: Read timeout of one delivery attempt (longest wait for the answer's first bytes), seconds.
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    #: How long a callback keeps being retried after its first attempt, seconds; then it is failed.
    callback_delivery_window_seconds: int = Field(default=6 * 3600, ge=0)
    #: First retry delay; doubles each retry up to callback_backoff_max_seconds. A waiting retry is
    #: an unacknowledged broker message, so the maximum must stay below the Redis
    #: visibility_timeout_seconds (and below RabbitMQ's consumer_timeout, 30 min by default).
    callback_backoff_seconds: int = Field(default=2, ge=1)
    callback_backoff_max_seconds: int = Field(default=600, ge=1)
    #: SSRF guard: callback hosts must resolve to public addresses, except these. Comma-separated
    #: host names ("backend.internal", "*.svc.cluster.local") whose addresses are trusted ...
    callback_allowed_hosts: str = ""
    #: ... and comma-separated networks that may be called though not public ("10.20.0.0/16").
    callback_allowed_networks: str = ""
    #: Allow loopback callbacks (127.0.0.0/8, ::1): local development and tests only.
    callback_allow_loopback: bool = False

    # --- gateway ---------------------------------------------------------------------------------------
    #: Comma-separated API keys; callers send one as "Authorization: Bearer <key>" or "X-API-Key".
    #: Empty = the API is open (a warning is logged at start-up).
    stemgen_api_keys: str = ""
    #: Comma-separated admin API keys: accepted as API keys, and they may read, follow, cancel and
    #: list every job (other keys see only their own). Empty = none.
    stemgen_admin_keys: str = ""
    #: Per API key: most jobs not yet finished, and most new jobs a minute (sliding 60 s window);
    #: over either, POST /generate answers 429 with Retry-After. 0 = no limit. No limits apply
    #: while the API is open (no keys).
    max_active_jobs_per_key: int = Field(default=0, ge=0)
    max_submissions_per_minute_per_key: int = Field(default=0, ge=0)
    #: Base of the status URLs returned to callers; empty = derived from the request.
    public_base_url: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Log lines: "text" (for a terminal) or "json" (one JSON object a line, with the job's ids;
    #: stemgen_logging). Secrets are masked in both.
    log_format: Literal["text", "json"] = "text"
    #: GET /metrics on the gateway (Prometheus text format, needs an API key as every endpoint but
    #: the probes does); false: no such route.
    gateway_metrics_enabled: bool = True
    #: Port on which a worker serves its Prometheus metrics (0: none), and the address it binds.
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535)
    worker_metrics_addr: str = "0.0.0.0"
    #: Seconds /health waits for worker replies.
    health_worker_timeout_seconds: float = 1.0
    #: GET /jobs/<id>/events sends a comment line this often while no event comes, so that
    #: proxies and load balancers keep the stream open and a vanished client is noticed.
    events_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)

    generation_margin_seconds: float = Field(
        default=1.0,
        description="Extra audio generated beyond the request so whole bars remain after the "
        "downbeat alignment of tempo conform.",
    )

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _decoding_combination(self) -> "Settings":
        from stems.precision import conflict

        reason = conflict(self.engine_mode, self.engine_precision, self.stemgen_device,
                          self.attention_backend)
        if reason:
            raise ValueError(reason)
        return self

    @model_validator(mode="after")
    def _retries_fit_visibility_timeout(self) -> "Settings":
        # A retry waiting for its countdown is an unacknowledged message: on Redis it would be handed
        # to a second worker once it is older than the visibility timeout.
        if self.callback_backoff_max_seconds >= self.visibility_timeout_seconds:
            raise ValueError("CALLBACK_BACKOFF_MAX_SECONDS must be below VISIBILITY_TIMEOUT_SECONDS")
        # A generation still running when its message is handed to a second worker is done twice;
        # one cut short by SIGKILL is lost until the visibility timeout.
        if self.generation_deadline_seconds >= self.visibility_timeout_seconds:
            raise ValueError("GENERATION_DEADLINE_SECONDS must be below VISIBILITY_TIMEOUT_SECONDS")
        if self.generation_deadline_seconds > self.worker_grace_period_seconds:
            raise ValueError("GENERATION_DEADLINE_SECONDS must be at most WORKER_GRACE_PERIOD_SECONDS")
        return self

    @staticmethod
    def split_list(value: str) -> list[str]:
        """Items of a comma-separated setting, stripped, empty ones dropped."""
        return [item.strip() for item in value.split(",") if item.strip()]

    @property
    def api_keys(self) -> list[str]:
        return self.split_list(self.stemgen_api_keys)

    @property
    def admin_keys(self) -> list[str]:
        return self.split_list(self.stemgen_admin_keys)

    @property
    def served_models(self) -> list[str]:
        """The models a request may choose (``parameters.model``), the first being the default:
        MUSICGEN_MODELS, else the one MUSICGEN_MODEL."""
        return self.split_list(self.musicgen_models) or [self.musicgen_model]

    def stems_queue_for(self, model: str) -> str:
        """The queue of ``model``'s generation tasks: STEMS_QUEUE when one model is served, else
        one queue per model (``<STEMS_QUEUE>.<model with / as ->``), consumed by the workers that
        hold it."""
        if len(self.served_models) == 1:
            return self.stems_queue
        return f"{self.stems_queue}.{model.replace('/', '-')}"


def load_settings(**overrides) -> Settings:
    """Read settings from the environment; keyword overrides win (used by tests and the CLI)."""
    return Settings(**overrides)
