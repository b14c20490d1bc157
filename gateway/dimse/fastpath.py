"""Byte-level encoders for the two per-instance encodings on the C-STORE hot path.

For every received instance pynetdicom builds pydicom datasets twice just to
write a few dozen bytes: the file meta information of the staging file (chunked
receive) and the C-STORE-RSP command set. Both have a fixed layout, so we write
them directly; the output is byte-identical to pydicom's (the tests compare), and
anything unusual (an Offending Element, a handler bound to EVT_DIMSE_SENT) falls
back to pynetdicom's own code. This removes about 0.8 ms of CPU per instance.

Written against pynetdicom 3.0 (``pyproject.toml`` pins the minor version).
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

from pynetdicom import dimse_messages, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

IMPLEMENTATION_CLASS_UID = "2.25.250766541198410550057565841768035663352"
IMPLEMENTATION_VERSION_NAME = "STUDYBRIDGE_01"


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _uid(value: Any) -> bytes:
    return _even(str(value).encode("ascii", "replace"), b"\x00")


class FastFileMeta:
    """What pynetdicom's ``create_file_meta`` would hold, kept as plain strings."""

    __slots__ = ("sop_class_uid", "sop_instance_uid", "transfer_syntax")

    def __init__(self, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> None:
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax


def _explicit(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def encode_file_meta(meta: FastFileMeta) -> bytes:
    """File meta information group (explicit VR little endian), as pydicom writes it."""
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _uid(meta.sop_class_uid)),
            _explicit(0x0003, b"UI", _uid(meta.sop_instance_uid)),
            _explicit(0x0010, b"UI", _uid(meta.transfer_syntax)),
            _explicit(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _explicit(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode(), b" ")),
        )
    )
    return _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


_original_write_file_meta_info = dimse_messages.write_file_meta_info


def _create_file_meta(
    *, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any, **_ignored: Any
) -> FastFileMeta:
    return FastFileMeta(sop_class_uid, sop_instance_uid, transfer_syntax)


def _write_file_meta_info(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, FastFileMeta):
        fp.write(encode_file_meta(file_meta))
        return
    _original_write_file_meta_info(fp, file_meta, enforce_standard=enforce_standard)


# -- C-STORE-RSP -------------------------------------------------------------------
def _implicit(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def encode_c_response(
    command_field: int,
    sop_class_uid: str,
    message_id: int,
    status: int,
    comment: str = "",
    sop_instance_uid: str = "",
) -> bytes:
    """A DIMSE-C response command set without data set (implicit VR little endian)."""
    parts = []
    if sop_class_uid:
        parts.append(_implicit(0x0002, _uid(sop_class_uid)))
    parts.append(_implicit(0x0100, struct.pack("<H", command_field)))
    parts.append(_implicit(0x0120, struct.pack("<H", message_id)))
    parts.append(_implicit(0x0800, struct.pack("<H", 0x0101)))
    parts.append(_implicit(0x0900, struct.pack("<H", status)))
    if comment:
        parts.append(_implicit(0x0902, _even(str(comment).encode("ascii", "replace"), b" ")))
    if sop_instance_uid:
        parts.append(_implicit(0x1000, _uid(sop_instance_uid)))
    body = b"".join(parts)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def encode_store_response(rsp: C_STORE) -> bytes | None:
    """The C-STORE-RSP command set (implicit VR little endian), or None if unusual."""
    if rsp.MessageIDBeingRespondedTo is None or rsp.Status is None:
        return None
    if getattr(rsp, "OffendingElement", None):
        return None
    return encode_c_response(
        0x8001,
        rsp.AffectedSOPClassUID or "",
        rsp.MessageIDBeingRespondedTo,
        rsp.Status,
        getattr(rsp, "ErrorComment", None) or "",
        rsp.AffectedSOPInstanceUID or "",
    )


_original_send_msg = DIMSEServiceProvider.send_msg


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        encoded = encode_store_response(primitive)
        max_pdu = self.maximum_pdu_size
        if encoded is not None and (max_pdu == 0 or len(encoded) + 6 <= max_pdu):
            pdata = P_DATA()
            # Message control header 0x03: command information, last fragment.
            pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
            self.dul.send_pdu(pdata)
            return
    _original_send_msg(self, primitive, context_id)


def install() -> None:
    """Use the byte-level encoders in this process."""
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[assignment]
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
