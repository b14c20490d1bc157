"""Forwarding: push a stored study (or series) to a peer's PACS by C-STORE.

Each forward is a job kept in the index (``models``), with one line per instance,
so it resumes after any interruption without sending an instance twice
(``jobs``). Identifiers can be reconciled for the receiving institution in the
manner of IHE IRWF.b (``reconcile``); the archived copy is never modified.
"""
