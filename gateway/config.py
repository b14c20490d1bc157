"""The one settings object of studybridge.

Values come, highest priority first, from keyword arguments (the CLI), environment
variables prefixed ``STUDYBRIDGE_`` (``STUDYBRIDGE_DIMSE_PORT=11113``), an optional
TOML file (``STUDYBRIDGE_CONFIG=/etc/studybridge.toml`` or ``--config``), and the
embedded defaults: a ``./var`` data folder holding a filesystem blob store and a
SQLite index, DIMSE on 11112 as ``STUDYBRIDGE``, HTTP on 8080.

No other module reads the environment; everything receives a ``Settings``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# How an OpenID Connect client authenticates at the provider's token endpoint.
TokenAuth = Literal["client_secret_basic", "client_secret_post"]


class Settings(BaseSettings):
    """Configuration of one studybridge installation."""

    model_config = SettingsConfigDict(
        env_prefix="STUDYBRIDGE_", extra="forbid", validate_default=True
    )

    # Where the embedded defaults keep their files.
    data_dir: Path = Path("./var")
    # SQLAlchemy URL of the index; empty means SQLite in data_dir.
    database_url: str = ""
    # PostgreSQL connection pool of each process: connections kept open, extra ones
    # under load, seconds to wait for a free one, seconds before one is renewed.
    db_pool_size: int = 5
    db_max_overflow: int = 10
    db_pool_timeout: float = 30.0
    db_pool_recycle: float = 1800.0
    # Seconds a pooled connection may sit unused before it is tested with a round trip
    # at its next use (sooner if the server closed it).
    db_pool_ping_after: float = 5.0
    # Blob store: "file" keeps instances below blob_dir (default data_dir/blobs);
    # "s3" in a bucket of an S3-compatible object store (MinIO, AWS S3, SeaweedFS).
    blob_store: Literal["file", "s3"] = "file"
    blob_dir: Path | None = None
    # S3: endpoint as host:port, TLS unless s3_secure is false, keys under s3_prefix.
    s3_endpoint: str = ""
    s3_bucket: str = "studybridge"
    s3_prefix: str = ""
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_region: str = ""
    s3_secure: bool = True
    # Create the bucket at start when missing (else it must exist).
    s3_create_bucket: bool = True
    # Server-side encryption: "" none, "s3" (SSE-S3), "kms" (SSE-KMS with s3_kms_key_id).
    s3_sse: Literal["", "s3", "kms"] = ""
    s3_kms_key_id: str = ""
    # Objects larger than this go up as multipart uploads of parts this size (>= 5 MiB).
    s3_part_size: int = 16 * 1024 * 1024
    # Seconds to connect / wait for an answer; failed requests are retried this often.
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 60.0
    s3_retries: int = 2

    # DICOM node.
    ae_title: str = "STUDYBRIDGE"
    dimse_host: str = "0.0.0.0"  # noqa: S104 - a DICOM node must be reachable by PACS
    dimse_port: int = 11112
    # Receiving processes sharing the DIMSE port (0 = one per CPU core, at least 2).
    dimse_workers: int = 0
    # Associations one receiving process serves at once; more are refused (transient).
    max_associations: int = 32
    # Largest P-DATA PDU we accept (bytes); 0 would be unlimited, which lets a peer
    # make us hold a whole dataset in one PDU in memory.
    max_pdu_size: int = 4 * 1024 * 1024
    # Seconds: waiting for A-ASSOCIATE/A-RELEASE (ARTIM), for a DIMSE message,
    # and for any network activity on an established association (idle).
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    # Seconds to wait for a peer to accept the TCP connection of an association we open.
    dimse_connect_timeout: float = 15.0
    # Seconds a stopping process waits for running associations/requests to finish.
    shutdown_grace: float = 10.0
    # Refuse unknown calling AE titles unless true (the demo profile sets it).
    accept_unknown_peers: bool = False
    # Issuer of Patient ID used when neither the dataset nor the peer names one.
    default_issuer: str = "STUDYBRIDGE"

    # TLS (gateway.dimse.tls): TLS 1.2+ with BCP 195 cipher suites. A DIMSE port
    # speaking DICOM TLS beside the plain one (0: none; 2762 is DICOM's TLS port).
    dimse_tls_port: int = 0
    # This node's certificate chain and private key (PEM), for DIMSE TLS and HTTPS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Client certificates: "none" (not asked for), "optional" (verified against
    # tls_ca_file when sent) or "required". A verified certificate of a registered
    # peer must name the peer's host.
    tls_client_certs: Literal["none", "optional", "required"] = "none"
    tls_ca_file: Path | None = None
    # Associations we open to peers registered with TLS (gateway.dimse.client): the
    # peer's certificate is verified against the peer's own CA file or tls_ca_file;
    # we present this certificate (default: tls_cert_file/tls_key_file). A client
    # certificate needs the clientAuth extended key usage if it has any.
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    # Serve HTTP as HTTPS (same certificate and client certificate settings).
    http_tls: bool = False

    # HTTP (DICOMweb and pages).
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Where the DICOMweb services are mounted.
    dicomweb_prefix: str = "/dicom-web"
    # QIDO-RS: default and largest page size (a larger limit is capped, with a Warning).
    qido_default_limit: int = 100
    qido_max_limit: int = 1000
    # STOW-RS: largest request body accepted (bytes); larger ones get 413.
    stow_max_bytes: int = 4 * 1024 * 1024 * 1024
    # POST /api/imports (zip upload): largest body accepted (bytes).
    import_max_bytes: int = 16 * 1024 * 1024 * 1024
    # Public base URL (e.g. "https://bridge.example.org") written into Retrieve URLs
    # and BulkDataURIs; empty: taken from each request.
    public_base_url: str = ""
    # Honour X-Forwarded-Proto/Host (only behind a proxy that sets them).
    trust_forwarded_headers: bool = False
    # GET /metrics: with a token, only for requests bearing it (Authorization: Bearer,
    # a Prometheus scrape config's credentials); without one, only for requests made
    # on this machine that did not come through a proxy.
    metrics_token: SecretStr = SecretStr("")
    # Origins allowed to call the HTTP API from a browser ("*" for any).
    cors_origins: list[str] = ["*"]

    # Closure transfers.
    # Ed25519 private key (PEM) signing transfer receipts; created on first use. Point
    # every gateway of one installation at the same file so all sign with one key.
    # Empty: data_dir/keys/receipt-ed25519.pem.
    receipt_key_file: Path | None = None
    # A census splits a C-FIND date range in halves while the source PACS answers at
    # least this many studies (PACS cap their C-FIND results).
    census_max_results: int = 500
    # Pull mode (C-MOVE of what is missing from the source PACS): C-MOVEs per minute
    # at most, allowed time windows ("22:00-06:00"; empty: any time) in
    # pull_timezone, attempts per study/series, first retry delay in seconds
    # (doubling, at most an hour).
    pull_rate_per_minute: float = 30.0
    pull_windows: list[str] = []
    pull_timezone: str = "UTC"
    pull_max_attempts: int = 8
    pull_backoff_seconds: float = 60.0
    # How often (seconds) due transfer pulls and forwarding jobs are resumed: by the
    # `serve` supervisor without a broker, by `studybridge worker --beat` with one.
    # 0: never (run `studybridge tasks run studybridge.forward` yourself).
    resume_interval: float = 60.0
    # Retention: years a study is kept from its Study Date (else from its arrival),
    # per record type (a modality: {"CR" = 5, "MG" = 10}); a study with several
    # modalities takes the longest. Others: retention_default_years.
    retention_default_years: int = 10
    retention_years: dict[str, int] = {}

    # Background tasks (gateway.tasks): derived work after ingest (series metadata,
    # thumbnails), sweeps, forwarding. Broker URL: empty runs the tasks in a thread
    # pool inside each serving process (embedded default, no broker); otherwise
    # redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1:5672// and
    # `studybridge worker` processes run them.
    task_broker_url: str = ""
    # Broker queue the gateways submit to and the workers consume.
    task_queue: str = "studybridge"
    # Seconds a task a worker took may stay unacknowledged before the broker hands it
    # to another worker (Redis/SQS visibility timeout): how soon the task of a killed
    # worker runs again. Longer than the longest task, or it may run twice (tasks
    # are idempotent, so that costs time, not correctness).
    task_visibility_timeout: float = 600.0
    # Threads running tasks in a serving process on the embedded default.
    task_threads: int = 2
    # Derived work of a series starts once its arrivals pause this many seconds, or
    # at the latest this many seconds after the first arrival of a burst.
    task_series_pause: float = 3.0
    task_series_max_wait: float = 60.0
    # Sweeps: how often (seconds) and what they remove: staging files and blobs no
    # index row names that are older than the grace period (seconds).
    sweep_interval: float = 3600.0
    sweep_grace: float = 24 * 3600.0

    # Consent, share links and audit (consent/).
    # Share links: default and longest lifetime (days).
    share_link_default_days: float = 7.0
    share_link_max_days: float = 30.0
    # Access tokens (exchanged for a share link, or issued at sign-in): lifetime.
    access_token_minutes: float = 60.0
    # Wrong access codes before a link, or a client address, is locked out, and for how long.
    access_code_max_failures: int = 5
    access_code_max_failures_per_client: int = 10
    access_code_lockout_minutes: float = 15.0
    # Failed sign-ins (POST /api/session: one account; POST /api/token: one client id)
    # before that account or client, or a client address, gets 429 with Retry-After,
    # counted within (and locked for up to) the lockout window.
    sign_in_max_failures: int = 5
    sign_in_max_failures_per_client: int = 20
    sign_in_lockout_minutes: float = 15.0
    # An external DICOMweb viewer that takes a token only in its URL (OHIF 3.x's
    # /viewer): a link exchange answers with its launch URL ?StudyInstanceUIDs=...&
    # token=<short-lived access token, never the share token>; empty: none.
    viewer_url: str = ""
    # An external viewer's IHE IID endpoint (".../IHEInvokeImageDisplay"): a share link's
    # holder may ask for a launch URL (requestType=STUDY&studyUID=...&access_token=<a
    # second short-lived access token of the link, never the share token>); empty: none.
    iid_viewer_url: str = ""
    # Sign-in through an OpenID Connect provider (consent.oidc; docs/security.md).
    # The issuer URL (its /.well-known/openid-configuration is read); empty: off.
    oidc_issuer: str = ""
    # This gateway's client at the provider, and how it authenticates at the token
    # endpoint.
    oidc_client_id: str = ""
    oidc_client_secret: SecretStr = SecretStr("")
    oidc_token_auth: TokenAuth = "client_secret_basic"  # noqa: S105 - a method's name
    oidc_scopes: list[str] = ["openid"]
    # The callback registered at the provider; empty: <public base URL or the
    # request's>/api/oidc/callback.
    oidc_redirect_url: str = ""
    # Where the provider sends the browser after signing out there (OpenID Connect
    # RP-Initiated Logout 1.0; register it at the provider, e.g.
    # https://bridge.example.org/viewer/signin); empty: the provider's own page.
    oidc_post_logout_redirect_url: str = ""
    # How a signed-in subject becomes a studybridge account:
    #   "subject": only accounts an operator bound to the subject
    #     (`studybridge users bind-oidc USER --subject SUB`); patients and staff.
    #   "institution-claim": bound accounts as above, and staff whose ID token carries
    #     oidc_institution_claim (a value of oidc_institutions, or an institution's
    #     name when that is empty) and oidc_role_claim (radiologist, clerk,
    #     institution_admin): their account is made at first sign-in and follows
    #     the claims at every sign-in after.
    oidc_claim_mapping: Literal["subject", "institution-claim"] = "subject"
    oidc_institution_claim: str = "institution"
    oidc_role_claim: str = "role"
    oidc_institutions: dict[str, str] = {}
    # ID token signature algorithms accepted (asymmetric only: HS* and "none" are
    # refused whatever this says) and the clock skew allowed (seconds).
    oidc_algorithms: list[str] = ["RS256", "PS256", "ES256", "EdDSA"]
    oidc_leeway_seconds: float = 60.0
    # Minutes a started sign-in may take before its callback is refused.
    oidc_login_minutes: float = 10.0
    # Break-glass grants: longest duration (minutes).
    break_glass_max_minutes: float = 240.0
    # Audit: repeats of one attempt within this window make one record.
    audit_window_seconds: float = 300.0
    # Ed25519 key signing audit checkpoints, and where checkpoints are appended; keep
    # the checkpoint file (or a copy) where database administrators cannot rewrite it.
    # Empty: data_dir/audit/signing-key.pem and data_dir/audit/checkpoints.jsonl.
    audit_key_file: Path | None = None
    audit_checkpoint_file: Path | None = None
    # How often (seconds) a signed checkpoint is appended (and, with a syslog collector,
    # new records are sent to it): by the `serve` supervisor without a broker, by
    # `studybridge worker --beat` with one. 0: never (run `audit checkpoint` yourself).
    audit_checkpoint_interval: float = 3600.0
    # Audit records as DICOM audit messages (PS3.15 A.5) to a syslog collector over
    # TLS (RFC 5425; IHE ATNA): host (empty: off), port, the CA file that verifies the
    # collector, and our client certificate and key when it asks for one. What was
    # sent is remembered per chain in data_dir/audit/syslog-cursor.json.
    audit_syslog_host: str = ""
    audit_syslog_port: int = 6514
    audit_syslog_ca_file: Path | None = None
    audit_syslog_cert_file: Path | None = None
    audit_syslog_key_file: Path | None = None

    # Profile: "production" refuses demo shortcuts; "demo" accepts any AE and says so.
    profile: Literal["default", "demo", "production"] = "default"

    log_level: str = "INFO"
    # "text" for people, "json" (one object per line, with request IDs) for collectors.
    log_format: Literal["text", "json"] = "text"

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16 or "\\" in value or not value.isprintable():
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _config_file_from_env()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # Derived locations -------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()

    @property
    def metrics_dir(self) -> Path:
        """Where the serving processes of one gateway keep their metric samples."""
        return (self.data_dir / "metrics").resolve()

    @property
    def staging_dir(self) -> Path:
        """Where incoming data is spooled before it becomes a blob.

        It sits inside the data folder so that, with the filesystem store, a received
        file becomes a blob by a rename instead of a copy.
        """
        return (self.data_dir / "staging").resolve()

    @property
    def resolved_receipt_key_file(self) -> Path:
        return (self.receipt_key_file or self.data_dir / "keys" / "receipt-ed25519.pem").resolve()

    @property
    def effective_accept_unknown_peers(self) -> bool:
        if self.profile == "production":
            return False
        return self.accept_unknown_peers or self.profile == "demo"

    @property
    def resolved_audit_key_file(self) -> Path:
        return (self.audit_key_file or self.data_dir / "audit" / "signing-key.pem").resolve()

    @property
    def resolved_audit_checkpoint_file(self) -> Path:
        path = self.audit_checkpoint_file or self.data_dir / "audit" / "checkpoints.jsonl"
        return path.resolve()

    @property
    def effective_dimse_workers(self) -> int:
        if self.dimse_workers > 0:
            return self.dimse_workers
        return max(2, os.cpu_count() or 2)


# The config file is located through the environment before the settings exist; this
# is the one place besides Settings itself that looks there.
_CONFIG_FILE_ENV = "STUDYBRIDGE_CONFIG"


def _config_file_from_env() -> Path | None:
    value = os.environ.get(_CONFIG_FILE_ENV)
    return Path(value) if value else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, optionally naming a TOML file and CLI overrides."""
    if config_file is not None:
        os.environ[_CONFIG_FILE_ENV] = str(config_file)
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)
