"""FastAPI dependencies shared by the DICOMweb routers."""

from __future__ import annotations

from fastapi import Request

from gateway.archive import Archive


async def get_archive(request: Request) -> Archive:
    # async: FastAPI runs a plain function dependency on the thread pool, a hop per
    # request for a lookup.
    archive: Archive = request.app.state.archive
    return archive


def requested_accept(request: Request) -> str | None:
    """The media types the client accepts: the ``accept`` query parameter, which
    PS3.18 8.3.3.1 says takes precedence (viewers such as OHIF send it together with
    a generic Accept header), else the Accept header."""
    return request.query_params.get("accept") or request.headers.get("accept")
