"""Request and response schemas (pydantic). The same models validate requests and generate the
OpenAPI document (api.openapi), so the two cannot drift apart."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from stems.plan import PlanError, parse_chord, parse_key

StemName = Literal["guitar", "bass", "drums"]
JobState = Literal["queued", "running", "cancelling", "completed", "failed", "partial", "cancelled"]
StemState = Literal["queued", "running", "completed", "failed", "cancelled"]
DeliveryState = Literal["none", "pending", "delivering", "delivered", "failed"]

#: generation_request_id becomes part of blob names and Redis keys: keep it to a safe alphabet.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


def _not_a_boolean(value):
    """A number field's value, refused when it is a JSON boolean (pydantic would take true as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


class OutputFormat(BaseModel):
    """``parameters.output``: the delivered files' format (every stem of the request)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["wav", "flac", "mp3"] = Field(
        "wav", description="wav (RIFF, PCM), flac (lossless, PCM) or mp3 (MPEG-1 Layer III, "
                           "constant bitrate, LAME tag with the encoder delay for gapless decoders).")
    sample_rate: Literal[32000, 44100, 48000] = Field(
        48000, description="Hz. MusicGen generates 32 kHz; other rates are resampled with soxr "
                           "(very high quality).")
    bit_depth: Optional[Literal[16, 24]] = Field(
        None, validate_default=True,
        description="PCM bits per sample, wav and flac only; default 24. Refused for mp3.")
    channels: Optional[Literal[1, 2]] = Field(
        None, description="1 or 2; default: the worker's model's own (stereo from a "
                          "musicgen-stereo-* model, else mono). 2 from a mono model copies the "
                          "channel (channels_source \"duplicated\" and a warning); 1 from a stereo "
                          "model averages the two (\"downmixed\").")
    bitrate_kbps: Optional[Literal[128, 160, 192, 224, 256, 320]] = Field(
        None, validate_default=True,
        description="mp3 only, constant bitrate in kbps; default 320. Refused for wav and flac.")

    @field_validator("sample_rate", "bit_depth", "channels", "bitrate_kbps", mode="before")
    @classmethod
    def _not_a_boolean(cls, value):
        return _not_a_boolean(value)

    @field_validator("bit_depth")
    @classmethod
    def _bit_depth_of_pcm(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        fmt = info.data.get("format")
        if fmt == "mp3":
            if value is not None:
                raise ValueError("does not apply to mp3 (a lossy format; use bitrate_kbps)")
            return None
        return 24 if value is None else value

    @field_validator("bitrate_kbps")
    @classmethod
    def _bitrate_of_mp3(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        fmt = info.data.get("format")
        if fmt in ("wav", "flac"):
            if value is not None:
                raise ValueError(f"applies to mp3 only, not {fmt}")
            return None
        return 320 if value is None and fmt == "mp3" else value


class SourceRegion(BaseModel):
    """``parameters.source_region``: the part of the user's song the stems are for. Bars are
    counted as musicians count them: bar 1 starts at the song's first downbeat. Only the shape is
    checked here; a region past the song's end fails the job (not retried), since the gateway
    never decodes the song."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    start_bar: Optional[int] = Field(
        None, ge=1, le=10000, description="First bar of the region (1: the bar that starts at the "
                                          "song's first downbeat). Not with start_seconds.")
    start_seconds: Optional[float] = Field(
        None, ge=0, description="Where the region starts in the song, seconds; snapped to the "
                                "nearest downbeat. Not with start_bar. Below SOURCE_AUDIO_MAX_SECONDS.")
    bars: Optional[int] = Field(
        None, ge=1, le=1024, description="Length of the region in bars; wins over "
                                         "duration_seconds. Default: duration_seconds in whole bars.")

    @field_validator("start_bar", "bars", mode="before")
    @classmethod
    def _not_a_boolean(cls, value):
        return _not_a_boolean(value)

    @field_validator("start_seconds")
    @classmethod
    def _within_a_song(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        limit = (info.context or {}).get("source_audio_max_seconds")
        if value is not None and limit is not None and value >= limit:
            raise ValueError(f"must be below {limit:g} seconds (SOURCE_AUDIO_MAX_SECONDS: no song "
                             "is longer)")
        return value

    @model_validator(mode="after")
    def _one_start(self) -> "SourceRegion":
        if self.start_bar is not None and self.start_seconds is not None:
            raise ValueError("give start_bar or start_seconds, not both")
        return self


def _region_within_max(region: SourceRegion, bpm: Optional[float], context: dict) -> None:
    """A region's length is checked here when the tempo is given (else once the song is analysed).

    Raises:
        ValueError: longer than MAX_DURATION_SECONDS.
    """
    limit = context.get("max_duration_seconds")
    if limit is None or region.bars is None or bpm is None:
        return
    seconds = region.bars * context.get("beats_per_bar", 4) * 60.0 / bpm
    if seconds > limit:
        raise ValueError(f"bars: {region.bars} bars at {bpm:g} BPM last {seconds:.1f} s, more than "
                         f"{limit:g} s (MAX_DURATION_SECONDS)")


class GenerationParameters(BaseModel):
    """What to generate. BPM in beats per minute, durations in seconds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Before target_bpm and key: their validators read it (they may come from the source audio).
    condition_on_audio: bool = Field(
        False, description="Stems that play along with the user's song: the source audio "
                           "(audio_file_id in the source container, or source_audio_url) is "
                           "analysed once; the plan is its tempo, key and the chords of "
                           "source_region's bars (target_bpm, key, chords override); stems are "
                           "warped onto its beat map and say where they belong (source_region).")
    source_audio_url: Optional[AnyHttpUrl] = Field(
        None, description="http(s) URL (e.g. a read SAS) of the source audio; used instead of "
                          "audio_file_id with condition_on_audio. Checked like callback_url.")
    target_bpm: Optional[float] = Field(
        None, ge=40, le=240, validate_default=True,
        description="Tempo of every stem, BPM. Required unless condition_on_audio is set (then it "
                    "defaults to the source's tempo; a different one gives stems on a constant "
                    "grid at this tempo).")
    source_region: Optional[SourceRegion] = Field(
        None, description='With condition_on_audio: the bars of the song the stems are for, '
                          '{"start_bar": n, "bars": m} or {"start_seconds": s} (snapped to the '
                          "nearest downbeat). Default: from the song's first downbeat.")
    source_mode: Literal["accompany", "continue"] = Field(
        "accompany", description='With condition_on_audio: "accompany" plays along with the '
                                 'region; "continue" continues the bars before it (text models).')
    duration_seconds: Optional[float] = Field(
        None, gt=0, validate_default=True,
        description="Requested length, seconds; the stem has the whole number of bars closest to "
                    "it. At most the configured MAX_DURATION_SECONDS. Optional when "
                    "source_region gives bars (which then win).")
    style: Optional[str] = Field(None, max_length=200, description='Genre or mood, e.g. "rock".')
    prompt: Optional[str] = Field(None, max_length=500, description="Free text for the model.")
    key: Optional[str] = Field(
        None, max_length=32, description='Key of every stem, e.g. "A minor", "F# major", "Bbm". '
                                         "Default: from chords, the source audio, or the seed.")
    chords: Optional[list[Annotated[str, Field(max_length=16)]]] = Field(
        None, min_length=1, max_length=64,
        description='Chord progression, one chord per bar, repeated over the bars, e.g. '
                    '["Am", "F", "C", "G"]. Default: a common progression of the style in the key.')
    model: Optional[str] = Field(
        None, max_length=200,
        description="The MusicGen model to generate with, one of those the deployment serves "
                    "(MUSICGEN_MODELS; GET /health lists them). Default: the first served.")
    arrangement: Literal["independent", "ensemble"] = Field(
        "independent",
        description='"independent": one MusicGen generation per stem, sharing the plan\'s key and '
                    'chords; "ensemble": one generation of the whole arrangement, separated into '
                    "stems with Demucs (parts of one performance).")
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1, description="Makes a request repeatable.")
    temperature: Optional[float] = Field(None, gt=0, le=5)
    top_k: Optional[int] = Field(None, ge=0, le=2048)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    cfg_coef: Optional[float] = Field(None, ge=0, le=20, description="Classifier-free guidance.")
    loop: bool = Field(False, description="Make each stem loop seamlessly (end joins start).")
    output: OutputFormat = Field(
        default_factory=OutputFormat,
        description="Format of the stem files; default 24-bit WAV at 48 kHz with the model's "
                    "channels. Loudness (-14 LUFS) and the true-peak ceiling (-1 dBTP) are "
                    "measured on the encoded file.")

    @field_validator("target_bpm", mode="after")
    @classmethod
    def _bpm_given_or_from_source(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        if value is None and not info.data.get("condition_on_audio"):
            raise ValueError("is required unless condition_on_audio is true")
        return value

    @field_validator("duration_seconds")
    @classmethod
    def _within_configured_max(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        if value is None:
            region = info.data.get("source_region", False)  # absent: the region itself is invalid
            if region is not False and (region is None or region.bars is None):
                raise ValueError("is required unless parameters.source_region gives bars")
            return value
        limit = (info.context or {}).get("max_duration_seconds")
        if limit is not None and value > limit:
            raise ValueError(f"must be at most {limit:g} seconds")
        return value

    @field_validator("source_region", "source_mode")
    @classmethod
    def _region_with_conditioning(cls, value, info: ValidationInfo):
        if value not in (None, "accompany") and not info.data.get("condition_on_audio"):
            raise ValueError("is only used with condition_on_audio: true")
        if isinstance(value, SourceRegion):
            _region_within_max(value, info.data.get("target_bpm"), info.context or {})
        return value

        seconds = region.bars * context.get("beats_per_bar", 4) * 60.0 / self.target_bpm
        if seconds > limit:
            raise ValueError(f"source_region.bars: {region.bars} bars at {self.target_bpm:g} BPM "
                             f"last {seconds:.1f} s, more than {limit:g} s (MAX_DURATION_SECONDS)")
        return self

    @field_validator("key")
    @classmethod
    def _known_key(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                parse_key(value)
            except PlanError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("chords")
    @classmethod
    def _known_chords(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        for index, name in enumerate(value or []):
            try:
                parse_chord(name)
            except PlanError as exc:
                raise ValueError(f"chords[{index}]: {exc}") from None
        return value

    @field_validator("source_audio_url")
    @classmethod
    def _only_with_conditioning(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("condition_on_audio"):
            raise ValueError("is only used with condition_on_audio: true")
        return value


class GenerateRequest(BaseModel):
    """POST /generate body, as the backend sends it."""

    model_config = ConfigDict(extra="forbid")

    generation_request_id: str = Field(pattern=REQUEST_ID_PATTERN,
                                       description="The backend's id; the idempotency key.")
    audio_file_id: str = Field(min_length=1, max_length=128)
    target_stems: list[StemName] = Field(min_length=1, max_length=3)
    callback_url: Optional[AnyHttpUrl] = Field(
        None, description="Where the result is POSTed; defaults to the configured DEFAULT_CALLBACK_URL.")
    parameters: GenerationParameters

    @field_validator("target_stems")
    @classmethod
    def _unique(cls, stems: list[str]) -> list[str]:
        if len(set(stems)) != len(stems):
            raise ValueError("stems must not repeat")
        return stems


class JobAccepted(BaseModel):
    """202 (new job) or 200 (the same request again) answer of POST /generate."""

    job_id: str
    generation_request_id: str
    status: JobState
    status_url: str
    stems: list[StemName]


class TempoReport(BaseModel):
    model_config = ConfigDict(extra="allow")
    target_bpm: float
    source_bpm: float
    confidence: float
    method: str
    bars: int
    grid: Optional[Literal["song-beats", "constant-bpm"]] = Field(
        None, description='"song-beats": warped onto the song\'s own beat map over the region '
                          '(song_beats_seconds, from the stem\'s start, are the warp\'s anchors); '
                          '"constant-bpm": on a constant grid at target_bpm.')
    song_beats_seconds: Optional[list[float]] = Field(
        None, description="song-beats only: the song's beats over the region, seconds from the "
                          "region's first downbeat (the stem's start).")


class SourceRegionResult(BaseModel):
    """Where a stem belongs on the song's timeline (with condition_on_audio)."""

    model_config = ConfigDict(extra="allow")
    start_bar: int = Field(description="The region's first bar; bar 1 starts at the song's first downbeat.")
    bars: int
    start_seconds: float = Field(description="The region's first downbeat in the song, seconds: "
                                             "drop the stem here and it plays in time.")
    end_seconds: float = Field(description="The downbeat after the region's last bar, seconds.")
    first_downbeat_seconds: float = Field(description="The song's first downbeat (bar 1), seconds.")
    bpm: float = Field(description="The song's mean tempo over the region, BPM.")
    grid: Literal["song-beats", "constant-bpm"]


class ConditioningAudio(BaseModel):
    """The audio that conditioned a stem's generation, as handed to the model."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["chroma", "continuation"]
    origin: Optional[str] = Field(None, description='"song-region" (the region\'s '
                                  'own samples), "song-before-region" (continue) or "plan" (the '
                                  "plan's chords rendered).")
    sample_rate: int
    channels: int
    samples: int
    sha256: str = Field(description="SHA-256 of the float32 samples given to the model.")
    start_sample: Optional[int] = Field(None, description="From the song: its first sample.")
    end_sample: Optional[int] = Field(None, description="From the song: one past its last sample.")


class LoudnessReportModel(BaseModel):
    model_config = ConfigDict(extra="allow")
    integrated_lufs: Optional[float]
    true_peak_dbtp: Optional[float]
    gain_db: float


class StemResult(BaseModel):
    """One stem's state; url and the measurements appear once it is completed."""

    model_config = ConfigDict(extra="allow")
    stem: StemName
    status: StemState
    progress: float = Field(ge=0, le=1)
    url: Optional[str] = None
    blob_name: Optional[str] = None
    duration_seconds: Optional[float] = None
    bpm: Optional[float] = None
    sample_rate: Optional[int] = Field(None, description="Hz, as parameters.output asked.")
    format: Optional[Literal["wav", "flac", "mp3"]] = None
    content_type: Optional[str] = Field(
        None, description="The blob's Content-Type: audio/wav, audio/flac or audio/mpeg.")
    bit_depth: Optional[int] = Field(None, description="wav and flac: PCM bits per sample.")
    bitrate_kbps: Optional[int] = Field(None, description="mp3: constant bitrate, kbps.")
    channels: Optional[int] = None
    channels_source: Optional[Literal["model", "duplicated", "downmixed"]] = Field(
        None, description='"model": the model\'s own channels; "duplicated": a mono model\'s '
                          'channel in both (with a warning); "downmixed": a stereo model\'s '
                          "channels averaged.")
    tempo: Optional[TempoReport] = None
    loudness: Optional[LoudnessReportModel] = None
    analysis: Optional[dict] = Field(
        None, description="Estimated key (Krumhansl-Schmuckler over chroma) with a confidence, its "
                          "agreement with the plan, and the per-bar chord fit (harmonic stems).")
    silent: Optional[bool] = Field(
        None, description="Ensemble only: the separated stem is nearly silent (level below "
                          "SEPARATION_SILENT_STEM_DB relative to the mix); it is kept, not gained up.")
    warnings: Optional[list[str]] = None
    error: Optional[str] = None
    source_region: Optional[SourceRegionResult] = Field(
        None, description="With condition_on_audio: where the stem belongs in the song.")
    conditioning_audio: Optional[ConditioningAudio] = None


class MusicalPlanModel(BaseModel):
    """The request's musical plan (stems.plan.MusicalPlan.to_dict): every stem follows it. With
    condition_on_audio it also has ``source_audio`` (the song's origin, duration, BPM, key with
    its confidence, first downbeat, bars) and ``overrides`` (the request's key, chords and
    target_bpm that replace the song's, each with the song's own)."""

    model_config = ConfigDict(extra="allow")
    key: str = Field(description='e.g. "A minor"')
    tonic: str
    mode: Literal["major", "minor"]
    bpm: float
    bars: int
    time_signature: str
    progression: list[str] = Field(description="The chord cycle.")
    chords: list[str] = Field(description="One chord per bar.")
    source: str = Field(description='Where key and chords came from ("source-audio": the song).')


class CallbackState(BaseModel):
    url: Optional[str]
    state: DeliveryState
    attempts: int = Field(description="Delivery attempts so far.")
    error: Optional[str] = Field(description="Why the last attempt failed.")
    next_attempt_at: Optional[float] = Field(None, description="Unix time of the next attempt, while pending.")
    delivered_at: Optional[float] = Field(None, description="Unix time the backend accepted the callback.")


class JobStatus(BaseModel):
    """GET /jobs/{job_id} answer."""

    job_id: str
    generation_request_id: str
    audio_file_id: Optional[str]
    status: JobState
    progress: float = Field(ge=0, le=1)
    created_at: float = Field(description="Unix time, seconds.")
    updated_at: float
    finished_at: Optional[float]
    stems: list[StemResult]
    callback: CallbackState
    plan: Optional[MusicalPlanModel] = Field(
        None, description="The job's musical plan; null until known (with condition_on_audio it "
                          "is made once the source audio is analysed).")
    coherence: Optional[dict] = Field(
        None, description="Once finished: each harmonic stem's estimated key against the plan "
                          "(and the source), and the per-bar chroma fit with the plan's chords.")
    error: Optional[str] = Field(None, description="Why the job failed, once finished.")
    cancel_requested_at: Optional[float] = Field(
        None, description="Unix time of the first DELETE /jobs/{job_id}; the job is then "
                          "`cancelling` until it ends `cancelled`.")


#: GET /jobs page sizes.
LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 100


class JobListQuery(BaseModel):
    """GET /jobs query parameters."""

    model_config = ConfigDict(extra="forbid")

    status: Optional[JobState] = Field(None, description="Only jobs in this state.")
    generation_request_id: Optional[str] = Field(
        None, pattern=REQUEST_ID_PATTERN,
        description="Only the job of this generation_request_id (at most one job).")
    limit: int = Field(LIST_DEFAULT_LIMIT, ge=1, le=LIST_MAX_LIMIT,
                       description="Most jobs in the page.")
    cursor: Optional[str] = Field(
        None, min_length=1, max_length=200,
        description="next_cursor of the previous page (opaque); absent for the first page.")


class StemSummary(BaseModel):
    stem: StemName
    status: StemState
    progress: float = Field(ge=0, le=1)
    error: Optional[str] = None


class JobSummary(BaseModel):
    """One job of GET /jobs: its state and each stem's; GET status_url for the results."""

    job_id: str
    generation_request_id: str
    audio_file_id: Optional[str]
    status: JobState
    progress: float = Field(ge=0, le=1, description="Mean of the stems' progress.")
    created_at: float = Field(description="Unix time, seconds.")
    updated_at: float
    finished_at: Optional[float]
    stems: list[StemSummary]
    status_url: str = Field(description="GET /jobs/{job_id}: the job's results.")
    events_url: str = Field(description="GET /jobs/{job_id}/events: its live progress.")


class JobList(BaseModel):
    """GET /jobs answer: the caller's jobs, newest first."""

    jobs: list[JobSummary]
    next_cursor: Optional[str] = Field(
        description="Pass as cursor for the next page; null at the end. A page may hold fewer "
                    "than limit jobs (even none: expired or filtered out) and still have one.")


class JobEventData(BaseModel):
    """``data`` of an ``event: job`` (Server-Sent Events of GET /jobs/{job_id}/events): the job's
    status changed. The event with a final status (completed, partial, failed, cancelled) is the
    last."""

    job_id: str
    status: JobState
    error: Optional[str] = Field(None, description="With a final status: why stems failed.")


class StemEventData(BaseModel):
    """``data`` of an ``event: stem`` (a stem's status changed) or ``event: progress`` (a running
    stem's progress moved; stored, and sent, at most every 2 %)."""

    job_id: str
    stem: StemName
    status: StemState
    progress: float = Field(ge=0, le=1)
    url: Optional[str] = Field(None, description="Completed: the stem's read URL (SAS).")
    error: Optional[str] = Field(None, description="Failed: why.")


class CallbackBody(BaseModel):
    """What stemgen POSTs to the callback URL when a job ends.

    Headers: X-Stemgen-Event-Id (same on every retry), X-Stemgen-Timestamp (Unix seconds) and, with a
    secret configured, X-Stemgen-Signature: sha256=hex(HMAC-SHA256(secret, timestamp + "." + body)).
    """

    event: Literal["generation.finished"]
    job_id: str
    generation_request_id: str
    audio_file_id: Optional[str]
    status: Literal["completed", "failed", "partial", "cancelled"]
    stems: list[StemResult]
    error: Optional[str]
    plan: Optional[MusicalPlanModel] = None
    coherence: Optional[dict] = None


class FieldError(BaseModel):
    field: str = Field(description='Dotted path of the offending field, e.g. "parameters.target_bpm".')
    message: str
    type: str


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str
    fields: list[FieldError] = []


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: ErrorDetail


class HealthComponent(BaseModel):
    ok: bool
    detail: str = ""


class OutboxBacklog(BaseModel):
    """Jobs accepted but not yet sent to the broker (tasks.dispatcher)."""

    pending: int = Field(ge=0)
    #: How long the most overdue job has been waiting past its due time; growing: no dispatcher.
    overdue_seconds: float = Field(ge=0)


class ServedModel(BaseModel):
    """A model requests may choose, its queue, and the workers that answered holding it."""

    model: str
    default: bool
    queue: str
    workers: list[str]


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    broker: HealthComponent
    storage: HealthComponent
    workers: list[dict]
    models: list[ServedModel] = []
    outbox: OutboxBacklog | None = None
