"""The archive core: ingest, query and retrieve over an index and a blob store.

It knows nothing of HTTP, DIMSE, pages or consent. ``Archive`` bundles what one
process needs: the settings, the index database, the blob store and the ingestor.
"""

from __future__ import annotations

from pathlib import Path

from gateway.archive.blobstore import BlobStore, FileStore
from gateway.archive.db import Database, migrate
from gateway.archive.ingest import Ingestor, IngestResult, Outcome, Source
from gateway.archive.query import Level, Query, QueryResult, run_query
from gateway.archive.retrieve import RetrieveRequest, StoredInstance, find_instances
from gateway.config import Settings


class Archive:
    def __init__(self, settings: Settings, db: Database, store: BlobStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.ingestor = Ingestor(db, store, settings.staging_dir, settings.default_issuer)

    @classmethod
    def open(cls, settings: Settings, *, migrate_schema: bool = False) -> Archive:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        if migrate_schema:
            migrate(url)
        return cls(settings, Database(url), make_blob_store(settings))

    def ingest_file(self, path: Path, source: Source, *, owned: bool = False) -> IngestResult:
        return self.ingestor.ingest_file(path, source, owned=owned)

    def query(self, query: Query) -> QueryResult:
        return run_query(self.db, query)

    def find_instances(self, request: RetrieveRequest) -> list[StoredInstance]:
        return find_instances(self.db, request)

    def close(self) -> None:
        self.db.dispose()


def make_blob_store(settings: Settings) -> BlobStore:
    return FileStore(settings.resolved_blob_dir)


__all__ = [
    "Archive",
    "IngestResult",
    "Level",
    "Outcome",
    "Query",
    "QueryResult",
    "RetrieveRequest",
    "Source",
    "StoredInstance",
]
