"""The FastAPI application served by ``studybridge serve``.

For now it answers the operational endpoints: ``/healthz`` (the process is up)
and ``/readyz`` (the index and the blob store answer). The DICOMweb services
(QIDO-RS, WADO-RS, STOW-RS) mount here under ``/dicom-web``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from gateway import __version__
from gateway.archive import Archive
from gateway.archive.errors import ArchiveError
from gateway.config import Settings


def create_app(settings: Settings) -> FastAPI:
    archive = Archive.open(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        archive.close()

    app = FastAPI(title="studybridge", version=__version__, lifespan=lifespan)
    app.state.archive = archive

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        problems = []
        try:
            with archive.db.read_conn() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            problems.append(f"index: {exc.__class__.__name__}")
        try:
            archive.store.check()
        except ArchiveError as exc:
            problems.append(f"blob store: {exc}")
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app
