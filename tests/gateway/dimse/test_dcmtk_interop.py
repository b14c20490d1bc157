"""The DICOM node against real dcmtk peers: echoscu, storescu, findscu, movescu, getscu.

One ``studybridge serve`` runs for the module, with the dcmtk tools registered as
peers from 127.0.0.1, and a dcmtk storescp as the C-MOVE destination.
"""

from __future__ import annotations

import os
import re
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import truncate_pg
from tests.factories import ct_series, uid
from tests.servers import (
    Gateway,
    dataset_bytes,
    process_group_alive,
    require_tool,
    run_tool,
    running_gateway,
    storescp,
)

pytestmark = pytest.mark.integration

# pydicom's real files in several transfer syntaxes.
# Each has its own SOP Instance UID (several MR_small variants share one), with the
# storescu option that proposes its transfer syntax (storescu otherwise decompresses).
REAL_FILES = {
    "CT_small.dcm": "-xe",  # explicit VR little endian
    "MR_small_bigendian.dcm": "-xb",  # explicit VR big endian
    "image_dfl.dcm": "-xd",  # deflated
    "SC_rgb_rle.dcm": "-xr",  # RLE lossless
    "GDCMJ2K_TextGBR.dcm": "-xv",  # JPEG 2000 lossless
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",  # JPEG baseline
    "emri_small_jpeg_ls_lossless.dcm": "-xt",  # JPEG-LS lossless, enhanced multi-frame
    "rtplan.dcm": "-xi",  # a non-image storage class, implicit VR
}


@pytest.fixture(scope="module")
def dest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    with storescp(tmp_path_factory.mktemp("dest")) as value:
        yield value


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    dest: tuple[int, Path],
) -> Iterator[Gateway]:
    """The node on the embedded SQLite index, then on PostgreSQL."""
    require_tool("storescu")
    tmp = tmp_path_factory.mktemp("gw")
    env = {}
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        truncate_pg(url)
        env["STUDYBRIDGE_DATABASE_URL"] = url
    with running_gateway(tmp, env) as gw:
        # One institution's systems: they see (C-FIND, C-MOVE, C-GET) what it sent.
        for aet in ("ECHOSCU", "STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "PYSCU"):
            gw.cli(
                "peers",
                "add",
                aet,
                "--host",
                "127.0.0.1",
                "--port",
                "104",
                "--institution",
                INSTITUTION,
            )
        # Another institution's: it sees none of that.
        gw.cli(
            "peers",
            "add",
            "OTHERSCU",
            "--host",
            "127.0.0.1",
            "--port",
            "104",
            "--institution",
            "Elsewhere",
        )
        for aet, host, port, institution in (
            ("DEST", "127.0.0.1", dest[0], INSTITUTION),
            ("FARAWAY", "192.0.2.10", 104, INSTITUTION),
            # The same storescp, registered as another institution's system.
            ("ELSEDEST", "127.0.0.1", dest[0], "Elsewhere"),
        ):
            gw.cli(
                "peers",
                "add",
                aet,
                "--host",
                host,
                "--port",
                str(port),
                "--institution",
                institution,
            )
        gw.start("--dimse-workers", "2")
        yield gw
        code = gw.stop()
        assert code == 0, gw.log_text()
        assert not process_group_alive(gw.proc.pid), "a child of serve outlived it"


INSTITUTION = "Test Hospital"


def _addr(gw: Gateway) -> list[str]:
    return ["-aec", gw.ae_title, "127.0.0.1", str(gw.dimse_port)]


def test_echo(gateway: Gateway) -> None:
    result = run_tool([require_tool("echoscu"), "-aet", "ECHOSCU", *_addr(gateway)])
    assert result.returncode == 0, result.stderr


def test_unknown_calling_ae_is_refused(gateway: Gateway) -> None:
    result = run_tool([require_tool("echoscu"), "-aet", "NOBODY", *_addr(gateway)])
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def test_registered_ae_from_another_host_is_refused(gateway: Gateway) -> None:
    result = run_tool([require_tool("echoscu"), "-aet", "FARAWAY", *_addr(gateway)])
    assert result.returncode != 0


def test_systems_of_a_disabled_institution_are_refused(gateway: Gateway) -> None:
    gateway.cli("institutions", "add", "Closing Clinic")
    gateway.cli(
        "peers",
        "add",
        "CLOSINGSCU",
        "--host",
        "127.0.0.1",
        "--port",
        "104",
        "--institution",
        "Closing Clinic",
    )
    echo = [require_tool("echoscu"), "-aet", "CLOSINGSCU", *_addr(gateway)]
    assert run_tool(echo).returncode == 0
    gateway.cli("institutions", "disable", "Closing Clinic")
    refused = run_tool(echo)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert "disabled institution 'Closing Clinic'" in gateway.log_text()


def _store(gw: Gateway, files: list[Path], *extra: str) -> None:
    result = run_tool(
        [require_tool("storescu"), "-aet", "STORESCU", "-R", *extra, *_addr(gw), *map(str, files)]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stored_count(gw: Gateway) -> int:
    out = gw.cli("stats", "--json").stdout
    return int(re.search(r'"instances": (\d+)', out).group(1))


def test_store_find_move_get_synthetic_series(
    gateway: Gateway, dest: tuple[int, Path], tmp_path: Path
) -> None:
    study = uid()
    files = ct_series(
        tmp_path / "in", 12, study_uid=study, patient_id="DCMTK-1", patient_name="TESTER^ALPHA"
    )
    before = _stored_count(gateway)
    _store(gateway, files)
    assert _stored_count(gateway) == before + 12

    # C-FIND, study root, by wildcard name.
    result = run_tool(
        [
            require_tool("findscu"),
            "-aet",
            "FINDSCU",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=TESTER^AL*",
            "-k",
            "StudyInstanceUID",
            "-k",
            "NumberOfStudyRelatedInstances",
            "-k",
            "ModalitiesInStudy",
            *_addr(gateway),
        ]
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert study in text
    assert re.search(r"\[12\].*NumberOfStudyRelatedInstances", text)
    assert "[CT]" in text

    # C-FIND, patient root, PATIENT level.
    result = run_tool(
        [
            require_tool("findscu"),
            "-aet",
            "FINDSCU",
            "-P",
            "-k",
            "QueryRetrieveLevel=PATIENT",
            "-k",
            "PatientID=DCMTK-1",
            "-k",
            "PatientName",
            "-k",
            "NumberOfPatientRelatedInstances",
            *_addr(gateway),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "TESTER^ALPHA" in result.stdout + result.stderr

    # C-MOVE to the dcmtk storescp: the data sets arrive byte-identical.
    _port, out = dest
    result = run_tool(
        [
            require_tool("movescu"),
            "-aet",
            "MOVESCU",
            "-aem",
            "DEST",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            *_addr(gateway),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    originals = {pydicom.dcmread(f).SOPInstanceUID: dataset_bytes(f) for f in files}
    received = {}
    for path in out.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPInstanceUID in originals:
            received[ds.SOPInstanceUID] = dataset_bytes(path)
    assert received.keys() == originals.keys()
    assert all(received[k] == originals[k] for k in originals)

    # C-GET into a folder.
    get_dir = tmp_path / "got"
    get_dir.mkdir()
    result = run_tool(
        [
            require_tool("getscu"),
            "-aet",
            "GETSCU",
            "-S",
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            f"SeriesInstanceUID={pydicom.dcmread(files[0]).SeriesInstanceUID}",
            "-od",
            str(get_dir),
            *_addr(gateway),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in get_dir.iterdir()}
    assert got == originals


def test_another_institution_neither_finds_nor_retrieves_the_study(
    gateway: Gateway, dest: tuple[int, Path], tmp_path: Path
) -> None:
    study = uid()
    files = ct_series(tmp_path / "in", 2, study_uid=study, patient_id="DCMTK-2")
    _store(gateway, files)
    find = [
        require_tool("findscu"),
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "-k",
        "NumberOfStudyRelatedInstances",
        *_addr(gateway),
    ]
    mine = run_tool([find[0], "-aet", "FINDSCU", *find[1:]])
    assert study in mine.stdout + mine.stderr
    other = run_tool([find[0], "-aet", "OTHERSCU", *find[1:]])
    assert other.returncode == 0, other.stderr
    assert study not in other.stdout + other.stderr
    # C-MOVE and C-GET of the study: zero sub-operations, as for a study we do not hold.
    moved = run_tool(
        [
            require_tool("movescu"),
            "-aet",
            "OTHERSCU",
            "-aem",
            "DEST",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            *_addr(gateway),
        ]
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    _port, out = dest
    sops = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    arrived = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out.iterdir()}
    assert not sops & arrived
    got_dir = tmp_path / "got"
    got_dir.mkdir()
    got = run_tool(
        [
            require_tool("getscu"),
            "-aet",
            "OTHERSCU",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "-od",
            str(got_dir),
            *_addr(gateway),
        ]
    )
    assert list(got_dir.iterdir()) == [], got.stdout + got.stderr
    # Both attempts are in the audit trail, denied.
    exported = gateway.cli("audit", "export", "--format", "text").stdout
    denied = [line for line in exported.splitlines() if study in line and "denied" in line]
    assert denied and all("OTHERSCU" in line for line in denied)


def test_move_to_another_institutions_destination_is_refused(
    gateway: Gateway, dest: tuple[int, Path], tmp_path: Path
) -> None:
    """A peer may not C-MOVE its studies to a system of an institution that may not
    download them itself; to its own institution's system they are delivered."""
    study = uid()
    files = ct_series(tmp_path / "in", 3, study_uid=study, patient_id="DCMTK-3")
    _store(gateway, files)
    sops = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    _port, out = dest

    def move(destination: str) -> str:
        result = run_tool(
            [
                require_tool("movescu"),
                "-v",
                "-aet",
                "MOVESCU",
                "-aem",
                destination,
                "-S",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study}",
                *_addr(gateway),
            ]
        )
        return result.stdout + result.stderr

    def arrived() -> set[str]:
        return {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out.iterdir()
        } & sops

    refused = move("ELSEDEST")
    # dcmtk names 0x0124 (Refused: Not Authorized, a PS3.7 general status) "Unknown".
    assert "Final Move Response (Unknown Status: 0x124)" in refused, refused
    assert arrived() == set()
    delivered = move("DEST")
    assert "0x124" not in delivered, delivered
    assert arrived() == sops
    exported = gateway.cli("audit", "export", "--format", "text").stdout
    lines = [line for line in exported.splitlines() if study in line and "op=move " in line]
    assert any("denied" in line and "ELSEDEST" in line for line in lines), exported[-2000:]
    assert any("allowed" in line and "to DEST" in line for line in lines), exported[-2000:]


def test_move_to_unknown_destination_fails(gateway: Gateway) -> None:
    result = run_tool(
        [
            require_tool("movescu"),
            "-aet",
            "MOVESCU",
            "-aem",
            "NOWHERE",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=1.2.3",
            *_addr(gateway),
        ]
    )
    text = result.stdout + result.stderr
    assert "MoveDestinationUnknown" in text


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_files_in_several_transfer_syntaxes_round_trip(
    gateway: Gateway, dest: tuple[int, Path], tmp_path: Path, name: str
) -> None:
    source = Path(get_testdata_file(name))
    original = pydicom.dcmread(source)
    ts = str(original.file_meta.TransferSyntaxUID)
    work = tmp_path / name
    shutil.copy(source, work)
    _store(gateway, [work], REAL_FILES[name])
    _port, out = dest
    before = set(os.listdir(out))
    result = run_tool(
        [
            require_tool("movescu"),
            "-aet",
            "MOVESCU",
            "-aem",
            "DEST",
            "-S",
            "-k",
            "QueryRetrieveLevel=IMAGE",
            "-k",
            f"StudyInstanceUID={original.StudyInstanceUID}",
            "-k",
            f"SeriesInstanceUID={original.SeriesInstanceUID}",
            "-k",
            f"SOPInstanceUID={original.SOPInstanceUID}",
            *_addr(gateway),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    new = [out / f for f in set(os.listdir(out)) - before]
    matches = [p for p in new if pydicom.dcmread(p).SOPInstanceUID == original.SOPInstanceUID]
    assert len(matches) == 1, (new, result.stdout + result.stderr)
    received = pydicom.dcmread(matches[0])
    assert str(received.file_meta.TransferSyntaxUID) == ts
    # What comes back is byte for byte what was stored (storescu itself may re-encode
    # a file while sending it, e.g. drop trailing padding, so compare with the blob).
    blobs = list(
        (gateway.data_dir / "blobs" / "studies").glob(
            f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{original.SOPInstanceUID}.*"
        )
    )
    assert len(blobs) == 1
    sent, kept = dataset_bytes(matches[0]), dataset_bytes(blobs[0])
    if pydicom.uid.UID(ts).is_deflated:
        # storescp inflates and deflates again when it writes the file.
        sent, kept = _inflate(sent), _inflate(kept)
    assert sent == kept
    # ... and it is the same data set as the original file.
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns", "PatientName"):
        assert received.get(keyword) == original.get(keyword)


def _inflate(data: bytes) -> bytes:
    return zlib.decompress(data, -zlib.MAX_WBITS)


def test_parallel_associations_all_stored(gateway: Gateway, tmp_path: Path) -> None:
    """Four storescu at once, spread over the receiving processes: nothing lost."""
    import subprocess

    from tests.servers import dcmtk_env

    study = uid()
    files = ct_series(tmp_path / "par", 40, study_uid=study, patient_id="PAR-1")
    before = _stored_count(gateway)
    procs = [
        subprocess.Popen(
            [require_tool("storescu"), "-aet", "STORESCU", *_addr(gateway), *map(str, files[i::4])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
        for i in range(4)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    assert _stored_count(gateway) == before + 40


def test_serve_refuses_a_port_in_use(gateway: Gateway, tmp_path: Path) -> None:
    result = gateway.cli(
        "serve", "--dimse-port", str(gateway.dimse_port), "--http-port", "0", check=False
    )
    assert result.returncode != 0
    assert "cannot listen for DIMSE" in result.stdout + result.stderr


@pytest.mark.parametrize("fast_path", [True, False], ids=["storage-only", "with-find"])
def test_store_into_another_institutions_study_is_refused(
    gateway: Gateway, tmp_path: Path, fast_path: bool
) -> None:
    """An institution sees what it sent: adding an instance to another's study would
    make that study visible to it, so C-STORE refuses it (Not Authorized), on the fast
    storage-only data phase and on pynetdicom's, and audits the refusal once."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

    theirs = uid()
    _store(gateway, ct_series(tmp_path / "theirs", 1, study_uid=theirs))  # Test Hospital's
    intruders = [pydicom.dcmread(p) for p in ct_series(tmp_path / "intruder", 2, study_uid=theirs)]
    own = pydicom.dcmread(ct_series(tmp_path / "own", 1)[0])
    ae = AE(ae_title="OTHERSCU")
    ae.add_requested_context(CTImageStorage)
    if not fast_path:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(ds) for ds in [*intruders, own]]
    finally:
        assoc.release()
    codes = [int(s.Status) for s in statuses]
    assert codes == [0x0124, 0x0124, 0x0000], codes  # a new study of its own is fine
    assert "another sender" in str(statuses[0].get("ErrorComment", ""))
    # Test Hospital's study did not grow, and Elsewhere still cannot find it.
    find = run_tool(
        [
            require_tool("findscu"),
            "-aet",
            "OTHERSCU",
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={theirs}",
            *_addr(gateway),
        ]
    )
    assert theirs not in find.stdout + find.stderr
    exported = gateway.cli("audit", "export", "--format", "text").stdout
    refused = [
        line
        for line in exported.splitlines()
        if theirs in line and "store" in line and "denied" in line and "OTHERSCU" in line
    ]
    assert len(refused) == 1, exported[-2000:]  # once per study and association
