"""Bad input and hostile clients against a running DICOM node.

Each failure must come back as the right DIMSE status, index nothing partial, and
leave the node serving everyone else. The node runs with short timeouts and a low
association limit so slow-client cases take seconds.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from tests.factories import ct_slice, uid, write
from tests.servers import Gateway, require_tool, run_tool, running_gateway

pytestmark = pytest.mark.integration

TIMEOUT = 3  # seconds: ACSE, DIMSE and idle timeouts of the node under test
MAX_ASSOC = 4  # per receiving process; two processes


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("robust")
    env = {
        "STUDYBRIDGE_ACSE_TIMEOUT": str(TIMEOUT),
        "STUDYBRIDGE_DIMSE_TIMEOUT": str(TIMEOUT),
        "STUDYBRIDGE_NETWORK_TIMEOUT": str(TIMEOUT),
        "STUDYBRIDGE_MAX_ASSOCIATIONS": str(MAX_ASSOC),
        "STUDYBRIDGE_SHUTDOWN_GRACE": "2",
    }
    with running_gateway(tmp, env) as gw:
        for aet in ("PYSCU", "STORESCU", "ECHOSCU"):
            # One institution: its C-FIND sees what its C-STORE sent (consent.access).
            gw.cli(
                "peers",
                "add",
                aet,
                "--host",
                "127.0.0.1",
                "--port",
                "104",
                "--institution",
                "Test Hospital",
            )
        gw.start("--dimse-workers", "2")
        yield gw
        assert gw.stop() == 0, gw.log_text()


def _ae() -> AE:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def _associate(ae: AE, node: Gateway) -> Any:
    """Associate, retrying transient rejections (a full node) for a few timeouts."""
    deadline = time.monotonic() + TIMEOUT * 3
    while True:
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title=node.ae_title)
        if assoc.is_established or time.monotonic() > deadline:
            return assoc
        time.sleep(0.2)


def _store(node: Gateway, ds: Dataset) -> Dataset:
    ae = _ae()
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = _associate(ae, node)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def _echo_ok(node: Gateway) -> bool:
    ae = _ae()
    ae.add_requested_context(Verification)
    assoc = _associate(ae, node)
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _instances(node: Gateway) -> int:
    import json

    return int(json.loads(node.cli("stats", "--json").stdout)["instances"])


def _nest(ds: Dataset, depth: int) -> None:
    """Hang a chain of sequences ``depth`` levels deep off the data set."""
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = [inner]
        inner = outer
    ds.ContentSequence = [inner]


def test_valid_store_succeeds(node: Gateway) -> None:
    assert _store(node, ct_slice()).Status == 0x0000


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2..3"), 0xC002),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "../../etc/passwd"), 0xC002),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1." + "2" * 70), 0xC002),
        (lambda ds: delattr(ds, "StudyInstanceUID"), 0xC001),
        (lambda ds: delattr(ds, "SeriesInstanceUID"), 0xC001),
        (lambda ds: _nest(ds, 120), 0xC000),
    ],
    ids=["empty-component", "path-traversal", "overlong", "no-study", "no-series", "nested"],
)
def test_invalid_datasets_get_specific_failures(node: Gateway, mutate, status: int) -> None:
    before = _instances(node)
    ds = ct_slice()
    mutate(ds)
    rsp = _store(node, ds)
    assert rsp.Status == status
    assert "ErrorComment" in rsp
    assert _instances(node) == before
    assert _echo_ok(node)


def test_study_under_another_patient_is_refused(node: Gateway) -> None:
    study = uid()
    assert _store(node, ct_slice(study_uid=study, patient_id="P-ONE")).Status == 0
    rsp = _store(node, ct_slice(study_uid=study, patient_id="P-TWO"))
    assert rsp.Status == 0xC011


def test_conflicting_content_is_refused_and_duplicate_accepted(node: Gateway) -> None:
    ds = ct_slice()
    assert _store(node, ds).Status == 0
    assert _store(node, ds).Status == 0  # the same bytes again: success
    ds.StudyDescription = "CHANGED"
    assert _store(node, ds).Status == 0xC010


def test_garbage_dataset_bytes_are_refused(node: Gateway, tmp_path: Path) -> None:
    """A C-STORE whose data set is not DICOM (sent raw, undecoded) is refused."""
    bad = tmp_path / "bad.dcm"
    ds = ct_slice()
    write(ds, bad)
    data = bad.read_bytes()
    # Keep preamble and file meta; replace the data set with noise.
    from gateway.archive.part10 import read_meta

    with open(bad, "rb") as fh:
        _meta, offset = read_meta(fh)
    bad.write_bytes(data[:offset] + b"\x08\x00\x05\x00ZZ\xff\xff" + b"\x01" * 300)
    before = _instances(node)
    ae = _ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title=node.ae_title)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        rsp = assoc.send_c_store(bad)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    assert rsp.Status in (0xC000, 0xC001, 0xC002)
    assert _instances(node) == before


def test_byte_exact_sender_is_stored_byte_exact(node: Gateway, tmp_path: Path) -> None:
    path = write(ct_slice(), tmp_path / "exact.dcm")
    ae = _ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title=node.ae_title)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assert assoc.send_c_store(path).Status == 0
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    ds = pydicom.dcmread(path)
    blobs = list(
        (node.data_dir / "blobs" / "studies").glob(
            f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.*"
        )
    )
    from tests.servers import dataset_bytes

    assert len(blobs) == 1
    assert dataset_bytes(blobs[0]) == dataset_bytes(path)


def test_unwritable_store_answers_retryable_failure_then_recovers(node: Gateway) -> None:
    blobs = node.data_dir / "blobs"
    moved = node.data_dir / "blobs-away"
    ds = ct_slice()
    before = _instances(node)
    blobs.rename(moved)
    blobs.write_text("not a directory: the store cannot write below it")
    try:
        rsp = _store(node, ds)
        assert rsp.Status == 0xA700  # Out of Resources: the sender may retry
    finally:
        blobs.unlink()
        moved.rename(blobs)
    assert _instances(node) == before  # nothing was indexed
    assert _store(node, ds).Status == 0  # the retry succeeds
    assert _instances(node) == before + 1


def test_malformed_pdu_does_not_hurt_the_node(node: Gateway) -> None:
    for payload in (
        b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0) + b"garbage",
        b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # abort before anything
        b"\xff" * 64,
        struct.pack(">BBI", 0x01, 0, 10) + b"\x00" * 10,  # short A-ASSOCIATE-RQ
    ):
        with socket.create_connection(("127.0.0.1", node.dimse_port), timeout=10) as sock:
            sock.sendall(payload)
            sock.settimeout(TIMEOUT * 3)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                sock.recv(1024)
    assert _echo_ok(node)


def test_slow_and_idle_clients_do_not_block_senders(node: Gateway, tmp_path: Path) -> None:
    # A client dribbling an association request one byte at a time ...
    stop = threading.Event()

    def dribble() -> None:
        with socket.create_connection(("127.0.0.1", node.dimse_port), timeout=30) as sock:
            request = b"\x01\x00" + struct.pack(">I", 200) + b"\x00" * 200
            for byte in request:
                if stop.is_set():
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    slow = threading.Thread(target=dribble, daemon=True)
    slow.start()
    # ... and idle TCP connections that never speak (fewer than one process's
    # association limit, so even if all land on one process there is room) ...
    idle = [socket.create_connection(("127.0.0.1", node.dimse_port)) for _ in range(2)]
    try:
        files = [write(ct_slice(instance_number=i), tmp_path / f"{i}.dcm") for i in range(5)]
        started = time.monotonic()
        command = [
            require_tool("storescu"),
            "-aet",
            "STORESCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.dimse_port),
            *map(str, files),
        ]
        result = run_tool(command)
        while "Local Limit Exceeded" in result.stderr and time.monotonic() - started < TIMEOUT * 3:
            # A transient refusal (connections of earlier tests still being dropped by
            # the same process): senders retry those; the ARTIM timeout bounds it.
            time.sleep(0.5)
            result = run_tool(command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - started < TIMEOUT * 4
    finally:
        stop.set()
        for sock in idle:
            sock.close()
        slow.join(TIMEOUT * 3)


def test_idle_connections_are_dropped_after_the_artim_timeout(node: Gateway) -> None:
    """More idle connections than the node admits: they are dropped, then all is well."""
    idle = [socket.create_connection(("127.0.0.1", node.dimse_port)) for _ in range(MAX_ASSOC * 3)]
    try:
        started = time.monotonic()
        for sock in idle:
            sock.settimeout(TIMEOUT * 4)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""  # closed by the node, not held forever
        assert time.monotonic() - started < TIMEOUT * 4
    finally:
        for sock in idle:
            sock.close()
    assert _echo_ok(node)


def test_association_limit_refuses_excess_and_recovers(node: Gateway) -> None:
    held = []
    refused = 0
    try:
        for _ in range(MAX_ASSOC * 2 + 4):
            ae = _ae()
            ae.add_requested_context(Verification)
            # No retry here: a refusal is what this test looks for.
            assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title=node.ae_title)
            if assoc.is_established:
                held.append(assoc)
            else:
                refused += 1
        assert refused >= 1
        assert len(held) <= MAX_ASSOC * 2
    finally:
        for assoc in held:
            assoc.release()
    time.sleep(0.5)
    assert _echo_ok(node)


def test_find_in_korean_with_requested_character_set(node: Gateway) -> None:
    source = next(Path(p) for p in get_charset_files() if p.endswith("chrKoreanMulti.dcm"))
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = uid()
    ds.StudyInstanceUID = uid()
    ds.SeriesInstanceUID = uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ae = _ae()
    ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, node)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0
        for charset, name in (
            (["", "ISO 2022 IR 149"], "김*"),  # Korean, as the sender encodes it
            (["ISO_IR 192"], "김*"),
            (["", "ISO 2022 IR 149"], "?희*"),
        ):
            query = Dataset()
            query.SpecificCharacterSet = charset
            query.QueryRetrieveLevel = "STUDY"
            query.PatientName = name
            query.StudyInstanceUID = ds.StudyInstanceUID
            answers = [
                identifier
                for status, identifier in assoc.send_c_find(
                    query, StudyRootQueryRetrieveInformationModelFind
                )
                if status and status.Status == 0xFF00
            ]
            assert len(answers) == 1, (charset, name)
            assert str(answers[0].PatientName) == str(ds.PatientName)
            assert list(answers[0].SpecificCharacterSet) == charset or (
                answers[0].SpecificCharacterSet == charset[0]
            )
        # A requester that declares only ASCII gets the answer in UTF-8.
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientName = ""
        query.StudyInstanceUID = ds.StudyInstanceUID
        answers = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status and status.Status == 0xFF00
        ]
        assert answers[0].SpecificCharacterSet == "ISO_IR 192"
        assert str(answers[0].PatientName) == str(ds.PatientName)
    finally:
        assoc.release()


def test_invalid_query_gets_a_failure_status(node: Gateway) -> None:
    ae = _ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, node)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyDate = "2024-2023-01"
        statuses = [
            s.Status
            for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if s
        ]
        assert statuses and statuses[-1] == 0xA900
    finally:
        assoc.release()
    assert _echo_ok(node)


def test_serve_leaves_no_staging_files(node: Gateway) -> None:
    staging = node.data_dir / "staging"
    leftovers = [p for p in staging.iterdir()] if staging.exists() else []
    assert leftovers == [], leftovers
    assert shutil.disk_usage(node.data_dir).free > 0
