"""The archive core: ingest, query and retrieve over an index and a blob store.

It knows nothing of HTTP, DIMSE, pages or consent. ``Archive`` bundles what one
process needs: the settings, the index database, the blob store, the ingestor, and
(opened on first use) the task dispatcher ``archive.tasks`` (``gateway.tasks``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.archive.blobstore import BlobStore, FileStore
from gateway.archive.db import Database, PoolSettings, migrate
from gateway.archive.errors import ArchiveError, StorageUnavailable
from gateway.archive.ingest import Digests, Ingestor, IngestResult, Outcome, Source
from gateway.archive.query import Level, Query, QueryResult, run_query
from gateway.archive.retrieve import RetrieveRequest, StoredInstance, find_instances
from gateway.config import Settings
from gateway.ops import metrics

if TYPE_CHECKING:
    from gateway.tasks.dispatch import Dispatcher
    from gateway.tasks.hooks import PostIngest

log = logging.getLogger(__name__)


class Archive:
    def __init__(self, settings: Settings, db: Database, store: BlobStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.ingestor = Ingestor(db, store, settings.staging_dir, settings.default_issuer)
        self._tasks: Dispatcher | None = None
        self._post_ingest: PostIngest | None = None

    @classmethod
    def open(
        cls, settings: Settings, *, migrate_schema: bool = False, post_ingest: bool = False
    ) -> Archive:
        """Open the configured backends. ``post_ingest`` (serving processes): each
        stored instance schedules its series' derived work (``gateway.tasks.hooks``)."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        if migrate_schema:
            migrate(url)
        db = Database(url, pool=pool_settings(settings))
        archive = cls(settings, db, make_blob_store(settings))
        if post_ingest:
            archive.start_post_ingest()
        return archive

    @property
    def tasks(self) -> Dispatcher:
        """Where tasks are submitted: a broker, or this process's task threads."""
        if self._tasks is None:
            from gateway.tasks.dispatch import open_dispatcher

            self._tasks = open_dispatcher(self.settings, self)
        return self._tasks

    def start_post_ingest(self) -> None:
        from gateway.tasks.hooks import PostIngest

        if self._post_ingest is None:
            self._post_ingest = PostIngest(self.tasks, self.settings)
            self.ingestor.after_store.append(self._post_ingest)

    def ingest_file(
        self, path: Path, source: Source, *, owned: bool = False, digests: Digests | None = None
    ) -> IngestResult:
        started = time.perf_counter()
        try:
            result = self.ingestor.ingest_file(path, source, owned=owned, digests=digests)
        except ArchiveError as exc:
            metrics.observe_failure(source.door, exc.reason)
            raise
        metrics.observe_ingest(
            source.door, result.outcome.value, result.size, time.perf_counter() - started
        )
        return result

    def query(self, query: Query) -> QueryResult:
        with metrics.QUERY_SECONDS.labels(query.level.value).time():
            return run_query(self.db, query)

    def find_instances(self, request: RetrieveRequest) -> list[StoredInstance]:
        return find_instances(self.db, request)

    def close(self) -> None:
        if self._post_ingest is not None:
            # With a broker, what waits for a pause is handed over; in-process it would
            # die with this process anyway (derived work is rebuilt on demand).
            self._post_ingest.close(flush=bool(self.settings.task_broker_url))
            self.ingestor.after_store.remove(self._post_ingest)
            self._post_ingest = None
        if self._tasks is not None:
            self._tasks.close()
            self._tasks = None
        self.db.dispose()


def pool_settings(settings: Settings) -> PoolSettings:
    return PoolSettings(
        size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        timeout=settings.db_pool_timeout,
        recycle=settings.db_pool_recycle,
        ping_after=settings.db_pool_ping_after,
    )


def make_blob_store(settings: Settings) -> BlobStore:
    """The configured blob store; an S3 bucket is checked (or created) here."""
    if settings.blob_store == "s3":
        from gateway.archive.s3store import S3Store

        store = S3Store(
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            region=settings.s3_region,
            secure=settings.s3_secure,
            prefix=settings.s3_prefix,
            sse=settings.s3_sse,
            kms_key_id=settings.s3_kms_key_id,
            part_size=settings.s3_part_size,
            connect_timeout=settings.s3_connect_timeout,
            read_timeout=settings.s3_read_timeout,
            retries=settings.s3_retries,
            create_bucket=settings.s3_create_bucket,
            scratch_dir=settings.staging_dir,
        )
        try:
            store.prepare()
        except StorageUnavailable as exc:
            # Start anyway: readiness reports it, and every write tries again.
            log.warning("blob store not ready: %s", exc)
        return store
    return FileStore(settings.resolved_blob_dir)


__all__ = [
    "Archive",
    "Digests",
    "IngestResult",
    "Level",
    "Outcome",
    "Query",
    "QueryResult",
    "RetrieveRequest",
    "Source",
    "StoredInstance",
]
