"""Closure transfers: a clinic that closes or suspends hands its whole archive over.

An operator registers a transfer (``records``); instances arriving from the clinic's
AE title, or imported with ``--transfer``, are tagged to it by the one ``ingest``;
the expected content comes from an uploaded manifest (``manifest``) or a C-FIND
census of the source PACS (``census``); ``report`` reconciles expected against
received; ``receipt`` signs what was received when the operator finalizes.
"""
