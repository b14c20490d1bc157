"""Consent, share links, access control and the audit trail.

``consent.access`` is the one access decision every door asks; ``consent.audit``
records every attempt. This package knows the archive's identifiers (studies,
issuer + Patient ID, source institution) but not the doors.
"""
