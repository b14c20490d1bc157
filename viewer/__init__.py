"""The web viewer door: pages that show a study in a browser.

The pages are static HTML, ES modules and CSS (no build step) served by the
studybridge app itself (``viewer.pages.create_app``, mounted under ``/viewer``).
They read images and metadata from the DICOMweb API over HTTP, as any external
viewer does, sending the access token of the share-link exchange as a Bearer
header; this package imports nothing from the other doors.
"""
