"""CT retrieved from the hospital's PACS (DICOMweb or DIMSE) into a local cache.

`client.pacs.retrieve.retrieve(config)` queries the PACS named in the site YAML and
copies its CT instances into `state_dir/pacs-cache/` (never into the data folders),
one atomic file per instance, skipping instances already there. Ingestion
(`client.ingest.scan_site`) then reads that cache with the same header checks and QA as
a folder, so a series gets the same case id and verdict either way. This package's
root imports no network library, so ingestion can name the cache cheaply.
"""
from .cache import CACHE_FOLDER, InstanceCache, cache_dir
from .types import PacsError, SeriesRef

__all__ = ["CACHE_FOLDER", "InstanceCache", "PacsError", "SeriesRef", "cache_dir"]
