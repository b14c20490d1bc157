"""Signed receipts of closure transfers, and their verification.

A receipt is a JSON document ``{"receipt": {...}, "signature": {...}}``. The
signature is Ed25519 over the canonical JSON of ``receipt`` (keys sorted, no
spaces, UTF-8). ``receipt`` names the transfer, the custodian, the status, counts
and bytes held, the studies still missing, and ``instances_hash``: SHA-256 over the
sorted list of the held instances' SHA-256 digests (hex, one per line, joined by
``\\n``; each digest is over the instance's data set bytes as received), so anyone
holding the list of digests can recompute it.

The signing key is a PEM file (``Settings.receipt_key_file``), created on first
use with mode 0600; every gateway of one installation points at the same file.
Verification trusts the key given to it (the gateway's own, or a public key file
the clinic was handed), never the public key embedded in the document, which is
there only to say which key signed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.archive.models import utcnow
from gateway.transfers.records import TransferInfo
from gateway.transfers.report import HeldInstance, Reconciliation

RECEIPT_TYPE = "studybridge.transfer-receipt"
HASH_RULE = (
    "sha256 over the held instances' data set SHA-256 digests (lowercase hex), sorted, "
    "joined with newlines"
)


class ReceiptError(ValueError):
    """A receipt or key cannot be read."""


# -- keys --------------------------------------------------------------------------


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in ``path``; a new one is created there if there is none."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            # O_EXCL: two gateways starting together never end up with two keys.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ReceiptError(f"cannot read the receipt signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ReceiptError(f"{path} is not an Ed25519 private key")
    return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key from a PEM file (a private key file gives its public half)."""
    data = Path(path).read_bytes()
    with contextlib.suppress(ValueError):
        pub = serialization.load_pem_public_key(data)
        if isinstance(pub, Ed25519PublicKey):
            return pub
    try:
        priv = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise ReceiptError(f"{path} holds no Ed25519 key") from exc
    if not isinstance(priv, Ed25519PrivateKey):
        raise ReceiptError(f"{path} holds no Ed25519 key")
    return priv.public_key()


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(pub)).hexdigest()[:16]


# -- building and signing ------------------------------------------------------------


def instances_hash(held: list[HeldInstance]) -> str:
    digests = sorted(h.sha256 for h in held)
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_receipt(
    transfer: TransferInfo, rec: Reconciliation, *, gateway_ae: str, status: str
) -> dict[str, Any]:
    counts = rec.counts()
    return {
        "type": RECEIPT_TYPE,
        "version": 1,
        "issued_at": utcnow().isoformat(),
        "status": status,
        "transfer": {
            "id": transfer.id,
            "institution": transfer.institution,
            "reason": transfer.reason,
            "effective_on": transfer.effective_on.isoformat() if transfer.effective_on else None,
            "ends_on": transfer.ends_on.isoformat() if transfer.ends_on else None,
            "source_ae": transfer.source_ae,
            "issuer_of_patient_id": transfer.issuer,
        },
        "custodian": {
            "name": transfer.custodian_name,
            "contact": transfer.custodian_contact,
            "gateway_ae": gateway_ae,
        },
        "counts": {
            "expected_studies": counts["expected_studies"],
            "expected_instances": counts["expected_instances"],
            "studies": counts["studies"],
            "series": counts["series"],
            "instances": counts["instances"],
            "bytes": counts["bytes"],
            "rejected": counts["rejected"],
            "duplicates": counts["duplicates"],
        },
        "instances_hash": {
            "algorithm": "sha256",
            "rule": HASH_RULE,
            "value": instances_hash(rec.held),
        },
        "missing": [
            {
                "study_uid": s.study_uid,
                "patient_id": s.patient_id,
                "study_date": s.study_date,
                "expected": s.expected,
                "received": s.received,
            }
            for s in rec.missing
        ],
        "rejected": [{"sop_uid": r.sop_uid, "reason": r.reason} for r in rec.rejected],
    }


def sign(receipt: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    pub = key.public_key()
    return {
        "receipt": receipt,
        "signature": {
            "algorithm": "Ed25519",
            "key_id": key_id(pub),
            "public_key": base64.b64encode(_raw(pub)).decode(),
            "value": base64.b64encode(key.sign(canonical(receipt))).decode(),
        },
    }


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


# -- verification ---------------------------------------------------------------------


@dataclass
class Verification:
    ok: bool
    problems: list[str] = field(default_factory=list)
    receipt: dict[str, Any] | None = None


def verify(text: str, trusted: Ed25519PublicKey) -> Verification:
    """Check a receipt's signature against the trusted key."""
    try:
        doc = json.loads(text)
        receipt = doc["receipt"]
        sig = doc["signature"]
        value = base64.b64decode(sig["value"], validate=True)
        algorithm = sig["algorithm"]
    except (ValueError, KeyError, TypeError) as exc:
        return Verification(False, [f"not a studybridge receipt: {exc}"])
    if not isinstance(receipt, dict) or receipt.get("type") != RECEIPT_TYPE:
        return Verification(False, ["not a studybridge transfer receipt"])
    if algorithm != "Ed25519":
        return Verification(False, [f"unsupported signature algorithm {algorithm!r}"])
    problems: list[str] = []
    if sig.get("key_id") != key_id(trusted):
        problems.append(
            f"signed with key {sig.get('key_id')!r}, not the trusted key {key_id(trusted)}"
        )
    try:
        trusted.verify(value, canonical(receipt))
    except InvalidSignature:
        problems.append("signature does not match the receipt's content (altered or forged)")
    return Verification(not problems, problems, receipt)


def check_against_held(receipt: dict[str, Any], held: list[HeldInstance]) -> list[str]:
    """Differences between a receipt and what the archive holds for its transfer now."""
    problems = []
    if receipt["counts"]["instances"] != len(held):
        problems.append(
            f"receipt lists {receipt['counts']['instances']} instances, archive holds {len(held)}"
        )
    if receipt["instances_hash"]["value"] != instances_hash(held):
        problems.append("hash over the held instances differs from the receipt's")
    return problems


# -- readable rendering ------------------------------------------------------------------


def render_text(document: dict[str, Any]) -> str:
    r = document["receipt"]
    t = r["transfer"]
    c = r["counts"]
    sig = document["signature"]
    lines = [
        "STUDYBRIDGE TRANSFER RECEIPT",
        "",
        f"Transfer {t['id']}: {t['reason']} of {t['institution']}",
        f"  effective on: {t['effective_on'] or '-'}"
        + (f", until {t['ends_on']}" if t.get("ends_on") else ""),
        f"  source AE: {t['source_ae'] or '-'}; Issuer of Patient ID: {t['issuer_of_patient_id']}",
        f"Custodian: {r['custodian']['name'] or '-'} ({r['custodian']['contact'] or '-'}), "
        f"gateway AE {r['custodian']['gateway_ae']}",
        f"Issued: {r['issued_at']}",
        f"Status: {r['status'].upper()}",
        "",
        f"Expected: {c['expected_studies']} studies, {c['expected_instances']} instances",
        f"Held:     {c['studies']} studies, {c['series']} series, {c['instances']} instances, "
        f"{c['bytes']} bytes",
        f"Refused:  {c['rejected']} instances; duplicate deliveries: {c['duplicates']}",
        f"Instances hash (SHA-256): {r['instances_hash']['value']}",
        f"  ({r['instances_hash']['rule']})",
    ]
    if r["missing"]:
        lines += ["", f"Missing or incomplete studies ({len(r['missing'])}):"]
        for m in r["missing"]:
            lines.append(
                f"  {m['study_uid']}  patient {m['patient_id'] or '-'}  date "
                f"{m['study_date'] or '-'}  received {m['received']} of {m['expected']}"
            )
    if r["rejected"]:
        lines += ["", f"Refused instances ({len(r['rejected'])}):"]
        for item in r["rejected"]:
            lines.append(f"  {item['sop_uid'] or '(unreadable)'}: {item['reason']}")
    lines += [
        "",
        f"Signed: {sig['algorithm']}, key {sig['key_id']}",
        "Check with: studybridge transfer verify-receipt <receipt.json>",
    ]
    return "\n".join(lines) + "\n"
