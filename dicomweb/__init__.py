"""The HTTP door: DICOMweb services and operational endpoints (FastAPI)."""
