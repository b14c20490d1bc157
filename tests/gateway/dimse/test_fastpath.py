"""The byte-level encoders give exactly what pydicom/pynetdicom would write."""

from __future__ import annotations

import io

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode

from gateway.dimse import fastpath

pytestmark = pytest.mark.fast

UIDS = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2"),  # odd lengths
    ("1.2.840.10008.5.1.4.1.1.7", "2.25." + "9" * 39, "1.2.840.10008.1.2.4.90"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "ts"), UIDS)
def test_file_meta_bytes_match_pydicom(sop_class: str, sop_instance: str, ts: str) -> None:
    reference = io.BytesIO()
    write_file_meta_info(
        reference,
        create_file_meta(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax=ts,
            implementation_uid=fastpath.IMPLEMENTATION_CLASS_UID,
            implementation_version=fastpath.IMPLEMENTATION_VERSION_NAME,
        ),
    )
    ours = fastpath.encode_file_meta(fastpath.FastFileMeta(sop_class, sop_instance, ts))
    assert ours == reference.getvalue()


@pytest.mark.parametrize(("sop_class", "sop_instance", "_ts"), UIDS)
@pytest.mark.parametrize(
    ("status", "comment"),
    [(0x0000, None), (0xC002, "Study Instance UID is not a valid UID: '1.2..3'"), (0xA700, "x")],
)
def test_store_response_bytes_match_pynetdicom(
    sop_class: str, sop_instance: str, _ts: str, status: int, comment: str | None
) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert fastpath.encode_store_response(rsp) == encode(message.command_set, True, True)


def test_unusual_responses_fall_back() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.Status = 0xC000
    rsp.OffendingElement = [0x00100020]
    assert fastpath.encode_store_response(rsp) is None
    request = C_STORE()
    request.MessageID = 1
    assert fastpath.encode_store_response(request) is None


def test_echo_response_bytes_match_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_ECHO_RSP
    from pynetdicom.dimse_primitives import C_ECHO

    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo = 3
    rsp.AffectedSOPClassUID = "1.2.840.10008.1.1"
    rsp.Status = 0x0000
    message = C_ECHO_RSP()
    message.primitive_to_message(rsp)
    ours = fastpath.encode_c_response(0x8030, "1.2.840.10008.1.1", 3, 0x0000)
    assert ours == encode(message.command_set, True, True)
