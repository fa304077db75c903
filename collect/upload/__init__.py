"""Uploading closed trace files to object storage (pyarrow filesystems only; never the analyzer)."""

from .uploader import BackgroundUploader, Planned, is_closed, object_key, plan, upload_file

__all__ = ["BackgroundUploader", "Planned", "is_closed", "object_key", "plan", "upload_file"]
