"""The capability description answered at the DICOMweb service root (GET {prefix}/).

It is built from what the app actually serves: the resource list comes from the
mounted routes (path, methods, service tag), QIDO-RS details from ``dicomweb.qido``,
and each other DICOMweb module may export a ``CAPABILITIES`` dict (media types,
transfer syntaxes, parameters) that is included under its service name. The
OpenAPI document of every route is at ``/openapi.json``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fastapi import FastAPI, Request
from pynetdicom import ALL_TRANSFER_SYNTAXES

from dicomweb import qido
from dicomweb.urls import service_url
from gateway import __version__
from gateway.config import Settings


def describe(
    app: FastAPI, request: Request, settings: Settings, modules: dict[str, ModuleType]
) -> dict[str, Any]:
    prefix = settings.dicomweb_prefix.rstrip("/")
    resources = []
    # The OpenAPI document lists every mounted route with its methods and service tag.
    for path, operations in app.openapi().get("paths", {}).items():
        if not path.startswith(prefix + "/") or path == prefix + "/":
            continue
        for method, operation in operations.items():
            tags = operation.get("tags") or [""]
            resources.append(
                {
                    "path": path[len(prefix) :],
                    "method": method.upper(),
                    "service": tags[0],
                    "summary": operation.get("summary", ""),
                }
            )
    services: dict[str, Any] = {"QIDO-RS": qido.capabilities(settings)}
    for name, module in modules.items():
        extra = getattr(module, "CAPABILITIES", None)
        if isinstance(extra, dict):
            services[name] = extra
    return {
        "service": "studybridge DICOMweb",
        "version": __version__,
        "base_url": service_url(request),
        "standard": "DICOM PS3.18",
        "resources": resources,
        "services": services,
        # Every way in (C-STORE, STOW-RS, import) stores instances as received, in any
        # of these transfer syntaxes.
        "storage_transfer_syntaxes": [str(ts) for ts in ALL_TRANSFER_SYNTAXES],
        "openapi": app.openapi_url,
        "conformance_statement": "docs/conformance-statement.md",
    }
