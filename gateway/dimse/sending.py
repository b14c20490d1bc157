"""Sending stored instances over C-STORE sub-operations (C-MOVE, C-GET, forwarding).

pynetdicom's retrieve service classes accept only ``Dataset`` objects from our
handlers and re-encode them. To send the data set exactly as received (byte
identical, never decoded), handlers yield a ``StoredRef`` (a Dataset carrying the
blob's path), and ``Association.send_c_store`` is wrapped once so that a
``StoredRef`` is streamed from its file in PDU-sized chunks whenever the peer
accepted the stored transfer syntax. Otherwise the instance is decoded and
pynetdicom converts it (uncompressed syntaxes), or it is decompressed first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from gateway.archive.retrieve import StoredInstance

log = logging.getLogger(__name__)

# Path-based sends stream the file instead of decoding it. Only StoredRef sends
# use paths, so this affects nothing else.
_config.STORE_SEND_CHUNKED_DATASET = True

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128


class StoredRef(Dataset):
    """A stored instance to send as it is; behaves as an (almost empty) Dataset."""

    def __init__(self, path: Path, inst: StoredInstance) -> None:
        super().__init__()
        self.SOPClassUID = inst.sop_class_uid
        self.SOPInstanceUID = inst.sop_uid
        # Attributes on a Dataset subclass must not look like DICOM keywords.
        object.__setattr__(self, "_sb_path", Path(path))
        object.__setattr__(self, "_sb_inst", inst)


def contexts_for(instances: Iterable[StoredInstance]) -> list[PresentationContext]:
    """Presentation contexts to propose for sending these instances.

    One context per (SOP class, stored transfer syntax) so the stored bytes can go
    as they are, plus one per SOP class offering the uncompressed syntaxes as a
    fallback; at most 128 (the protocol limit), exact matches first.
    """
    exact: dict[tuple[str, str], None] = {}
    classes: dict[str, None] = {}
    for inst in instances:
        exact[(inst.sop_class_uid, inst.transfer_syntax_uid)] = None
        classes[inst.sop_class_uid] = None
    contexts: list[PresentationContext] = []
    for sop_class, ts in exact:
        contexts.append(build_context(sop_class, [ts]))
    for sop_class in classes:
        contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    if len(contexts) > MAX_CONTEXTS:
        log.warning("more than %d presentation contexts needed; extra ones dropped", MAX_CONTEXTS)
        contexts = contexts[:MAX_CONTEXTS]
    return contexts


_original_send_c_store = Association.send_c_store


def _send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
    if isinstance(dataset, StoredRef):
        return _send_stored(self, dataset, *args, **kwargs)
    return _original_send_c_store(self, dataset, *args, **kwargs)


def _send_stored(assoc: Association, ref: StoredRef, *args: Any, **kwargs: Any) -> Dataset:
    inst: StoredInstance = object.__getattribute__(ref, "_sb_inst")
    path: Path = object.__getattribute__(ref, "_sb_path")
    try:
        # Streams the file as it is; needs a context with exactly the stored syntax.
        return _original_send_c_store(assoc, path, *args, **kwargs)
    except ValueError:
        pass
    ds = pydicom.dcmread(path)
    if UID(inst.transfer_syntax_uid).is_compressed:
        # The peer takes none of the stored syntax: send it decompressed.
        ds.decompress()
    return _original_send_c_store(assoc, ds, *args, **kwargs)


Association.send_c_store = _send_c_store  # type: ignore[method-assign]
