"""Azure Blob Storage for finished stems: one container, one blob per stem, read SAS URLs.

The only module that talks to Azure. One ``BlobServiceClient`` is built from a connection string;
transient failures are retried by the SDK's own retry policy (``ExponentialRetry``), not by us.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContentSettings,
    ExponentialRetry,
    generate_blob_sas,
)

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """Blob storage refused an operation (bad credentials, invalid name, ...)."""


class StorageUnavailable(StorageError):
    """Blob storage could not be reached (after the SDK's retries)."""


class BlobNotFound(StorageError):
    """The container or blob does not exist."""


class BlobTooLarge(StorageError):
    """The blob is larger than the caller accepts."""


@dataclass(frozen=True)
class StoredBlob:
    """Where a stem was stored."""

    container: str
    blob_name: str
    url: str            # with a read SAS when the credential can sign one
    size_bytes: int


@dataclass(frozen=True)
class BlobReader:
    """A blob opened for reading: its size (bytes), its Content-Type and an iterator of its bytes."""

    size: int
    content_type: str
    chunks: Iterator[bytes]


def blob_name_for(job_id: str, stem: str, extension: str = "wav") -> str:
    """Blob name of one stem: ``{job_id}/{stem}.{extension}``; the extension is the file's format
    (wav, flac or mp3: parameters.output). Job ids are random and unique, so two API keys never
    write one blob (their generation_request_ids may be equal)."""
    return f"{job_id}/{stem}.{extension}"


class InvalidBlobName(StorageError):
    """A blob name a caller gave that could leave its prefix ("." or ".." segments, a leading
    "/", an empty segment)."""


def source_blob_name(owner: str, audio_file_id: str) -> str:
    """The blob of a tenant's source song: ``{owner}/{audio_file_id}`` in the source container
    (``owner``: the API key's identifier, api.auth.key_id), or ``audio_file_id`` itself without
    API keys (an open API).

    Raises:
        InvalidBlobName: ``audio_file_id`` has a "." or ".." segment, an empty segment or a
            leading "/" (it could name a blob under another prefix once resolved).
    """
    segments = audio_file_id.split("/")
    if any(segment in ("", ".", "..") for segment in segments) or "\\" in audio_file_id:
        raise InvalidBlobName(f"audio_file_id {audio_file_id!r} is not a plain blob name")
    return f"{owner}/{audio_file_id}" if owner else audio_file_id


class BlobStore:
    """Stem uploads to one container.

    Args:
        connection_string: Azure Storage connection string (Azurite's development account locally).
        container: container name; created on first use when missing.
        sas_ttl_seconds: lifetime of read SAS tokens in returned URLs.
        retry_total: attempts of the SDK's ExponentialRetry policy; 0 for fast-failing probes.
        retry_initial_backoff_seconds, retry_increment_base: ExponentialRetry timing
            (wait ≈ initial + base**attempt seconds).
        timeout_seconds: connect and read timeout of each HTTP request.
    """

    def __init__(self, connection_string: str, container: str, *, sas_ttl_seconds: int = 86400,
                 retry_total: int = 5, retry_initial_backoff_seconds: float = 2,
                 retry_increment_base: float = 2, timeout_seconds: float = 20):
        # The policy retries refused connections only 3 times by default (about 20 s); an
        # outage of storage is mostly refused connections, so those get the full budget too.
        retry = ExponentialRetry(initial_backoff=retry_initial_backoff_seconds,
                                 increment_base=retry_increment_base, retry_total=retry_total,
                                 retry_connect=retry_total, retry_read=retry_total)
        try:
            self._service = BlobServiceClient.from_connection_string(
                connection_string, retry_policy=retry,
                connection_timeout=timeout_seconds, read_timeout=timeout_seconds)
        except ValueError as exc:
            raise StorageError(f"invalid storage connection string: {exc}") from exc
        self.container = container
        self._container = self._service.get_container_client(container)
        self._sas_ttl = timedelta(seconds=sas_ttl_seconds)
        self._container_ready = False

    def ensure_container(self) -> None:
        """Create the container if it does not exist.

        Raises:
            StorageUnavailable: storage unreachable. StorageError: refused.
        """
        if self._container_ready:
            return
        try:
            self._container.create_container(retry_hook=_log_retry)
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise _translate(exc) from exc
        self._container_ready = True

    def upload(self, blob_name: str, data: bytes, *, content_type: str,
               metadata: dict[str, str] | None = None) -> StoredBlob:
        """Upload (overwriting) one blob and return its URL.

        Overwriting makes a retried task idempotent: the same stem lands under the same name.

        Raises:
            StorageUnavailable: storage unreachable after retries. StorageError: refused.
        """
        self.ensure_container()
        blob = self._container.get_blob_client(blob_name)
        try:
            blob.upload_blob(data, overwrite=True,
                             content_settings=ContentSettings(content_type=content_type),
                             metadata={k: _metadata_value(v) for k, v in (metadata or {}).items()},
                             retry_hook=_log_retry)
        except AzureError as exc:
            raise _translate(exc) from exc
        return StoredBlob(self.container, blob_name, self.read_url(blob_name), len(data))

    def read_url(self, blob_name: str) -> str:
        """URL of a blob, with a time-limited read-only SAS when the account key is known.

        With a credential that cannot sign (no account key), the plain URL is returned: the
        container must then be readable to the backend by other means.
        """
        blob = self._container.get_blob_client(blob_name)
        credential = self._service.credential
        account_key = getattr(credential, "account_key", None)
        if not account_key:
            return blob.url
        sas = generate_blob_sas(
            account_name=self._service.account_name, container_name=self.container,
            blob_name=blob_name, account_key=account_key,
            permission=BlobSasPermissions(read=True),
            expiry=datetime.now(timezone.utc) + self._sas_ttl)
        return f"{blob.url}?{sas}"

    def download(self, blob_name: str, *, max_bytes: int | None = None) -> bytes:
        """Read a blob's bytes.

        Args:
            blob_name: name in this store's container.
            max_bytes: refuse a larger blob (its size is read from the blob's properties first,
                and the download stops there too, in case it grew meanwhile).

        Raises:
            BlobNotFound: no such container or blob. BlobTooLarge: over ``max_bytes``.
            StorageUnavailable: storage unreachable after retries. StorageError: refused.
        """
        blob = self._container.get_blob_client(blob_name)
        try:
            if max_bytes is not None:
                size = blob.get_blob_properties().size
                if size > max_bytes:
                    raise BlobTooLarge(f"blob {blob_name!r} is {size} bytes, more than {max_bytes}")
                return blob.download_blob(offset=0, length=size).readall() if size else b""
            return blob.download_blob().readall()
        except ResourceNotFoundError as exc:
            raise BlobNotFound(f"no blob {blob_name!r} in container {self.container!r}") from exc
        except AzureError as exc:
            raise _translate(exc) from exc

    def open_read(self, blob_name: str) -> "BlobReader":
        """Open a blob for reading in chunks (for relaying it without holding it whole).

        Raises:
            BlobNotFound: no such container or blob. StorageUnavailable, StorageError.
        """
        blob = self._container.get_blob_client(blob_name)
        try:
            downloader = blob.download_blob()
        except ResourceNotFoundError as exc:
            raise BlobNotFound(f"no blob {blob_name!r} in container {self.container!r}") from exc
        except AzureError as exc:
            raise _translate(exc) from exc
        properties = downloader.properties
        return BlobReader(size=int(properties.size),
                          content_type=properties.content_settings.content_type or "application/octet-stream",
                          chunks=downloader.chunks())

    def ping(self) -> None:
        """Check that storage answers and the container exists (creating it when missing).

        Raises:
            StorageUnavailable, StorageError.
        """
        self._container_ready = False
        self.ensure_container()


def _log_retry(retry_count: int = 0, request=None, response=None, error=None, **_) -> None:
    """The SDK's ``retry_hook`` (its ExponentialRetry calls it before each retry's wait): one
    warning per retried storage request, so that an outage's retries show and can be counted."""
    what = f"{request.method} {request.url.split('?', 1)[0]}" if request is not None else "request"
    why = error if error is not None else f"HTTP {getattr(response, 'status_code', '?')}"
    log.warning("storage retry %d of %s: %s", retry_count + 1, what, why)


def _metadata_value(value: object) -> str:
    # Blob metadata values travel as HTTP headers: ASCII only.
    return str(value).encode("ascii", "replace").decode("ascii")


def _translate(exc: AzureError) -> StorageError:
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return StorageUnavailable(f"blob storage unreachable: {exc.message}")
    if isinstance(exc, ClientAuthenticationError):
        return StorageError(f"blob storage refused the credentials: {exc.message}")
    return StorageError(f"blob storage error: {exc.message}")


def store_from_settings(settings, *, container: str | None = None, **overrides) -> BlobStore:
    """Build the BlobStore described by a ``stemgen_settings.Settings`` (for the stems container,
    or ``container``, e.g. the source audio container)."""
    kwargs = dict(sas_ttl_seconds=settings.sas_ttl_seconds,
                  retry_total=settings.storage_retry_total,
                  timeout_seconds=settings.storage_timeout_seconds)
    kwargs.update(overrides)
    return BlobStore(settings.azure_storage_connection_string,
                     container or settings.azure_storage_container, **kwargs)
