"""Azure Blob Storage for stems (the only package that imports the Azure SDK)."""

from storage.blob import (
    BlobNotFound,
    BlobReader,
    BlobStore,
    BlobTooLarge,
    InvalidBlobName,
    StorageError,
    StorageUnavailable,
    StoredBlob,
    blob_name_for,
    source_blob_name,
    store_from_settings,
)

__all__ = ["BlobNotFound", "BlobReader", "BlobStore", "BlobTooLarge", "InvalidBlobName", "StorageError",
           "StorageUnavailable", "StoredBlob", "blob_name_for", "source_blob_name",
           "store_from_settings"]
