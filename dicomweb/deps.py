"""FastAPI dependencies shared by the DICOMweb routers."""

from __future__ import annotations

from fastapi import Request

from gateway.archive import Archive


def get_archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive
