"""Studies as a FHIR R4 Bundle: ImagingStudy resources and the DICOMweb Endpoint that
serves them, in the spirit of IHE MADO (a manifest the next hospital can read to find
and retrieve the images instead of a CD).

``imaging_study_bundle`` reads the index only (no access decision: the caller makes
it) and names each study, series and instance by its UIDs (``urn:oid:``), with the
patient as a contained-like Patient resource identified by issuer + Patient ID.
Nothing secret goes in: the Endpoint is the DICOMweb base URL; a reader needs its
own access token.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from gateway.archive.db import Database
from gateway.archive.models import Instance, Patient, Series, Study

DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"


def imaging_study_bundle(
    db: Database, study_uids: Iterable[str], dicomweb_base: str, now: dt.datetime | None = None
) -> dict[str, Any]:
    """A ``collection`` Bundle: one Endpoint, one Patient per patient, one ImagingStudy
    per study held (studies not held are left out)."""
    now = now or dt.datetime.now(dt.UTC)
    wanted = sorted(set(study_uids))
    endpoint_id = str(uuid.uuid4())
    entries: list[dict[str, Any]] = [_entry(_endpoint(endpoint_id, dicomweb_base))]
    patients: dict[int, str] = {}
    with db.reading() as session:
        studies = session.execute(
            select(Study, Patient)
            .join(Patient, Patient.id == Study.patient_fk)
            .where(Study.study_uid.in_(wanted))
            .order_by(Study.study_uid)
        ).all()
        for study, patient in studies:
            if patient.id not in patients:
                patients[patient.id] = str(uuid.uuid4())
                entries.append(_entry(_patient(patients[patient.id], patient)))
            rows = session.execute(
                select(Series, Instance)
                .join(Instance, Instance.series_fk == Series.id)
                .where(Series.study_fk == study.id)
                .order_by(Series.series_number, Series.series_uid, Instance.instance_number)
            ).all()
            entries.append(_entry(_imaging_study(study, rows, patients[patient.id], endpoint_id)))
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "collection",
        "timestamp": now.isoformat(),
        "entry": entries,
    }


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}


def _endpoint(endpoint_id: str, address: str) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": endpoint_id,
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPES, "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


def _patient(patient_ref: str, patient: Patient) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_ref}
    if patient.patient_id:
        resource["identifier"] = [
            {
                "system": f"urn:studybridge:issuer:{patient.issuer}",
                "value": patient.patient_id,
                "assigner": {"display": patient.issuer},
            }
        ]
    if patient.patient_name:
        family, _, given = patient.patient_name.partition("=")[0].partition("^")
        name: dict[str, Any] = {"text": patient.patient_name.partition("=")[0].replace("^", " ")}
        if family:
            name["family"] = family
        if given:
            name["given"] = [g for g in given.split("^") if g][:1]
        resource["name"] = [name]
    if patient.sex in ("M", "F", "O"):
        resource["gender"] = {"M": "male", "F": "female", "O": "other"}[patient.sex]
    if len(patient.birth_date) == 8:
        b = patient.birth_date
        resource["birthDate"] = f"{b[:4]}-{b[4:6]}-{b[6:]}"
    return resource


def _imaging_study(
    study: Study, rows: list[Any], patient_ref: str, endpoint_id: str
) -> dict[str, Any]:
    series: dict[str, dict[str, Any]] = {}
    modalities: dict[str, None] = {}
    for s, inst in rows:
        entry = series.get(s.series_uid)
        if entry is None:
            entry = series[s.series_uid] = {"uid": s.series_uid, "instance": []}
            if s.series_number is not None:
                entry["number"] = s.series_number
            if s.modality:
                entry["modality"] = {"system": DCM, "code": s.modality}
                modalities[s.modality] = None
            if s.series_description:
                entry["description"] = s.series_description
            entry["endpoint"] = [{"reference": f"urn:uuid:{endpoint_id}"}]
        item: dict[str, Any] = {
            "uid": inst.sop_uid,
            "sopClass": {"system": DICOM_UID, "code": f"urn:oid:{inst.sop_class_uid}"},
        }
        if inst.instance_number is not None:
            item["number"] = inst.instance_number
        entry["instance"].append(item)
    for entry in series.values():
        entry["numberOfInstances"] = len(entry["instance"])
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": str(uuid.uuid4()),
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{study.study_uid}"}],
        "status": "available",
        "subject": {"reference": f"urn:uuid:{patient_ref}"},
        "endpoint": [{"reference": f"urn:uuid:{endpoint_id}"}],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(e["numberOfInstances"] for e in series.values()),
        "series": list(series.values()),
    }
    if study.accession_number:
        resource["identifier"].append(
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": study.accession_number,
            }
        )
    if modalities:
        resource["modality"] = [{"system": DCM, "code": m} for m in modalities]
    if study.study_description:
        resource["description"] = study.study_description
    if len(study.study_date) == 8:
        # FHIR wants a time zone with a time; DICOM times are the sender's local time
        # with none: the date alone is what can be said truthfully.
        d = study.study_date
        resource["started"] = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return resource
