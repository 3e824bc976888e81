"""Azure Blob Storage for stems (the only package that imports the Azure SDK)."""

from storage.blob import (
    BlobStore,
    StorageError,
    StorageUnavailable,
    StoredBlob,
    blob_name_for,
    store_from_settings,
)

__all__ = ["BlobStore", "StorageError", "StorageUnavailable", "StoredBlob", "blob_name_for",
           "store_from_settings"]
