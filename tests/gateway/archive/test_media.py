"""A study as a streamed zip with a DICOMDIR (PDI layout), read back by pydicom's
FileSet and by dcmtk's dcmdump."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from gateway.archive import Archive, Level, RetrieveRequest
from gateway.archive.errors import NotFound
from gateway.archive.media import DICOMDIR, PDI_FOLDER, README, iter_pdi_zip
from gateway.archive.retrieve import StoredInstance
from tests.gateway.archive.helpers import SOURCE
from tests.servers import require_tool
from tests.viewer.studies import CT_SLICES, ViewerStudy, make_study

pytestmark = [pytest.mark.production, pytest.mark.filterwarnings("ignore::UserWarning")]


def _stored(archive: Archive, tmp_path: Path) -> tuple[ViewerStudy, list[StoredInstance]]:
    study = make_study(tmp_path / "in")
    for path in sorted((tmp_path / "in").rglob("*.dcm")):
        archive.ingest_file(path, SOURCE)
    found = archive.find_instances(RetrieveRequest(Level.STUDY, study_uids=[study.study_uid]))
    return study, found


def _unzip(archive: Archive, instances: list[StoredInstance], out: Path) -> tuple[Path, int]:
    chunks = list(iter_pdi_zip(archive.store, instances, out.parent / "scratch", chunk_size=4096))
    zipped = out.parent / "study.zip"
    zipped.write_bytes(b"".join(chunks))
    with zipfile.ZipFile(zipped) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert names[:2] == [DICOMDIR, README]
        zf.extractall(out)
    return zipped, len(chunks)


@pytest.mark.fast
def test_zip_has_a_dicomdir_listing_every_instance(archive: Archive, tmp_path: Path) -> None:
    study, instances = _stored(archive, tmp_path)
    out = tmp_path / "media"
    _zipped, chunks = _unzip(archive, instances, out)
    assert chunks > len(instances)  # streamed, not built in one piece

    fs = FileSet(pydicom.dcmread(out / DICOMDIR))
    listed = {item.SOPInstanceUID: item for item in fs}
    assert set(listed) == {i.sop_uid for i in instances}
    assert len(listed) == CT_SLICES + 3
    by_sop = {i.sop_uid: i for i in instances}
    for sop, item in listed.items():
        path = Path(item.path)
        assert path.is_file()
        # IHE PDI: the DICOMDIR at the root, every DICOM file in the DICOM folder.
        parts = path.relative_to(out).parts
        assert parts[0] == PDI_FOLDER and list(item.ReferencedFileID) == list(parts), parts
        # Every File ID component is a PS3.10 one: 1-8 of A-Z, 0-9, _.
        assert all(re.fullmatch(r"[A-Z0-9_]{1,8}", p) for p in parts), parts
        # The file is the stored one, byte for byte.
        with archive.store.open(by_sop[sop].blob_key) as fh:
            assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(fh.read()).digest()
        assert item.TransferSyntaxUID == by_sop[sop].transfer_syntax_uid
    records = [
        r.DirectoryRecordType for r in pydicom.dcmread(out / DICOMDIR).DirectoryRecordSequence
    ]
    assert records.count("PATIENT") == 1 and records.count("STUDY") == 1
    assert records.count("SERIES") == 4
    assert records.count("IMAGE") == CT_SLICES + 1
    assert records.count("SR DOCUMENT") == 1 and records.count("ENCAP DOC") == 1
    patient = fs.find(PatientID="VIEW001")
    assert len(patient) == CT_SLICES + 3
    loaded = listed[next(iter(fs.find(Modality="SR"))).SOPInstanceUID].load()
    assert loaded.StudyInstanceUID == study.study_uid
    assert f"Study Instance UID {study.study_uid}" in (out / README).read_text()
    assert sorted(p.name for p in out.iterdir()) == [PDI_FOLDER, DICOMDIR, README]
    in_folder = [p for p in (out / PDI_FOLDER).rglob("*") if p.is_file()]
    assert len(in_folder) == len(instances)  # nothing but the listed DICOM files there


@pytest.mark.fast
def test_missing_blob_fails_before_the_first_byte(archive: Archive, tmp_path: Path) -> None:
    _study, instances = _stored(archive, tmp_path)
    archive.store.delete(instances[3].blob_key)
    with pytest.raises(NotFound):
        iter_pdi_zip(archive.store, instances, tmp_path / "scratch")
    with pytest.raises(NotFound):
        iter_pdi_zip(archive.store, [], tmp_path / "scratch")


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["sqlite"])
def test_dcmdump_reads_the_dicomdir(archive: Archive, tmp_path: Path, backend: str) -> None:
    dcmdump = require_tool("dcmdump")
    _study, instances = _stored(archive, tmp_path)
    out = tmp_path / "media"
    _unzip(archive, instances, out)
    result = subprocess.run(
        [dcmdump, "-E", "+L", str(out / DICOMDIR)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (
        "MediaStorageDirectoryStorage" in result.stdout or "1.2.840.10008.1.3.10" in result.stdout
    )
    for kind in ("PATIENT", "STUDY", "SERIES", "IMAGE", "SR DOCUMENT", "ENCAP DOC"):
        assert f"[{kind}" in result.stdout, kind
    assert "E:" not in result.stderr and "W:" not in result.stderr, result.stderr
