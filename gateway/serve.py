"""``studybridge serve``: one command that runs the DICOM node and the HTTP app.

The parent process migrates the schema once, clears the staging folder, checks
that the ports are free, then starts and supervises its children: several DIMSE
receiving processes sharing the DIMSE port, and one HTTP process. On SIGTERM or
SIGINT it asks every child to finish (they drain running associations/requests),
waits, and kills whatever is left, so no child outlives it. Children also ask the
kernel to terminate them if the parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.archive.db import migrate
from gateway.config import Settings
from gateway.ops.logs import setup_logging
from gateway.ops.metrics import prepare_multiprocess, process_exited
from gateway.runtime import configure_serving_process, freeze_startup_heap

# What the parent's periodic jobs (``Supervisor._*_periodically``) import.
PERIODIC_JOB_MODULES = (
    "gateway.archive",
    "gateway.archive.sweep",
    "gateway.forward.tasks",
    "gateway.tasks.audit",
    "gateway.tasks.registry",
    "gateway.tasks.sweeps",
    "gateway.transfers.tasks",
)

log = logging.getLogger("studybridge.serve")

_PR_SET_PDEATHSIG = 1
# Connections waiting to be accepted by a receiving process (socketserver's default is 5).
_BACKLOG = 128


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _dimse_child(
    settings: Settings,
    index: int,
    ready: Any,
    listeners: dict[str, socket.socket],
    counts: Any,
) -> None:
    _die_with_parent()
    setup_logging(settings.log_level, settings.log_format)
    from gateway.dimse.server import run_worker

    run_worker(settings, index, ready, listeners, counts)


def _http_child(settings: Settings, ready: Any) -> None:
    _die_with_parent()
    setup_logging(settings.log_level, settings.log_format)
    configure_serving_process()
    import uvicorn

    from dicomweb.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        # Client address and scheme from X-Forwarded-* only behind a trusted proxy.
        proxy_headers=settings.trust_forwarded_headers,
        forwarded_allow_ips="*" if settings.trust_forwarded_headers else None,
        **https_options(settings),
    )
    server = uvicorn.Server(config)
    freeze_startup_heap()
    threading.Thread(target=_signal_when_started, args=(server, ready), daemon=True).start()
    server.run()


def https_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS arguments when ``http_tls`` is on: the node's certificate, TLS 1.2+
    (Python's default minimum) with the BCP 195 cipher suites, client certificates
    as ``tls_client_certs`` says."""
    if not settings.http_tls:
        return {}
    import ssl

    from gateway.dimse.tls import BCP195_CIPHERS, TLSConfigError

    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise TLSConfigError("http_tls needs tls_cert_file and tls_key_file (PEM)")
    reqs = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }[settings.tls_client_certs]
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_ca_certs": str(settings.tls_ca_file) if settings.tls_ca_file else None,
        "ssl_cert_reqs": reqs,
        "ssl_ciphers": BCP195_CIPHERS,
    }


def _signal_when_started(server: Any, ready: Any) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    ready.set()


def check_port_free(host: str, port: int, what: str) -> None:
    listen_on(host, port, what, backlog=0).close()


def listen_on(host: str, port: int, what: str, *, backlog: int = _BACKLOG) -> socket.socket:
    """A listening socket on ``host:port`` (SystemExit, in plain words, if taken)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if backlog:
            # Accepted connections inherit it: C-STORE responses must not wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from exc
    return sock


def clear_staging(settings: Settings) -> None:
    """Remove leftovers of interrupted receives (nothing else is running yet)."""
    staging = settings.staging_dir
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)


class Supervisor:
    def __init__(self, settings: Settings, say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.say = say
        self.ctx = mp.get_context("spawn")
        self.children: dict[str, Any] = {}
        self.stopping = threading.Event()
        # Set by the signal handler, turned into ``stopping`` by the main thread (see
        # _on_signal).
        self._signalled = False
        # The DIMSE listening sockets, bound here once and shared by every receiving
        # process, and how many connections each process serves: the least busy one
        # accepts (gateway.dimse.balance).
        self.listeners: dict[str, socket.socket] = {}
        self.counts = self.ctx.RawArray("i", max(settings.effective_dimse_workers, 1))

    def _start(self, name: str) -> Any:
        ready = self.ctx.Event()
        if name == "http":
            proc = self.ctx.Process(
                target=_http_child, args=(self.settings, ready), name="http", daemon=False
            )
        else:
            index = int(name.split("-")[1])
            proc = self.ctx.Process(
                target=_dimse_child,
                args=(self.settings, index, ready, self.listeners, self.counts),
                name=name,
                daemon=False,
            )
        proc.start()
        self.children[name] = (proc, ready)
        return ready

    def run(self) -> int:
        try:
            return self._run()
        finally:
            for sock in self.listeners.values():
                sock.close()

    def _run(self) -> int:
        settings = self.settings
        check_port_free(settings.http_host, settings.http_port, "HTTP")
        self.listeners["dimse"] = listen_on(settings.dimse_host, settings.dimse_port, "DIMSE")
        if settings.dimse_tls_port:
            self.listeners["dimse-tls"] = listen_on(
                settings.dimse_host, settings.dimse_tls_port, "DICOM TLS"
            )
        if settings.dimse_tls_port or settings.http_tls:
            from gateway.dimse.tls import TLSConfigError, server_context

            try:  # unreadable certificates stop here, in plain words, not in a child
                if settings.dimse_tls_port:
                    server_context(settings)
                https_options(settings)
            except TLSConfigError as exc:
                raise SystemExit(f"TLS: {exc}") from exc
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(settings.resolved_database_url)
        refuse_demo_data(settings)
        clear_staging(settings)

        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        names = [f"dimse-{i}" for i in range(settings.effective_dimse_workers)] + ["http"]
        readies = [self._start(name) for name in names]
        deadline = time.monotonic() + 60
        for ready in readies:
            while not ready.wait(0.2):
                if self._stop_requested() or time.monotonic() > deadline:
                    break
                if any(not p.is_alive() for p, _ in self.children.values()):
                    self.say("a child process failed to start; stopping")
                    self._stop_children()
                    return 1
        if not self._stop_requested():
            self.say(
                f"studybridge ready: DICOM {settings.ae_title}@{settings.dimse_host}:"
                f"{settings.dimse_port}"
                + (f" and TLS :{settings.dimse_tls_port}" if settings.dimse_tls_port else "")
                + f" ({settings.effective_dimse_workers} receiving processes), "
                f"HTTP{'S' if settings.http_tls else ''} "
                f"{'https' if settings.http_tls else 'http'}://{settings.http_host}:"
                f"{settings.http_port}/, "
                f"data in {settings.data_dir.resolve()}"
            )
        # The periodic jobs import their modules lazily; imported here first, in one
        # thread: threads importing modules that import each other at the same moment
        # can deadlock Python's import system, which then fails one of them
        # (_DeadlockError killed the audit thread that way once: no checkpoint was
        # written for the rest of the run).
        for module in PERIODIC_JOB_MODULES:
            importlib.import_module(module)
        threading.Thread(target=self._sweep_periodically, name="sweeper", daemon=True).start()
        if not settings.task_broker_url and settings.resume_interval > 0:
            threading.Thread(target=self._resume_periodically, name="resumer", daemon=True).start()
        if not settings.task_broker_url and settings.audit_checkpoint_interval > 0:
            threading.Thread(target=self._audit_periodically, name="auditor", daemon=True).start()
        restarts: list[float] = []
        while not self._stop_requested():
            time.sleep(0.2)
            for name, (proc, _ready) in list(self.children.items()):
                if self._stop_requested() or proc.is_alive():
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5:
                    self.say(f"{name} keeps exiting (code {proc.exitcode}); stopping")
                    self._stop_children()
                    return 1
                log.warning("%s exited with code %s; restarting", name, proc.exitcode)
                if proc.pid is not None:
                    process_exited(proc.pid)
                self._start(name)
        self._stop_children()
        return 0

    def _sweep_periodically(self) -> None:
        """Sweep this gateway's staging folder; without a broker, orphan blobs too
        (with one, `studybridge worker --beat` schedules that sweep)."""
        from gateway.archive.sweep import sweep_staging

        settings = self.settings
        while not self.stopping.wait(settings.sweep_interval):
            try:
                sweep_staging(settings.staging_dir, settings.sweep_grace)
                if not settings.task_broker_url:
                    from gateway.archive import Archive
                    from gateway.tasks.registry import TaskContext
                    from gateway.tasks.sweeps import sweep

                    archive = Archive.open(settings)
                    try:
                        sweep(TaskContext(archive, settings))
                    finally:
                        archive.close()
            except Exception:
                log.exception("periodic sweep failed; trying again next interval")

    def _resume_periodically(self) -> None:
        """Without a broker: resume due transfer pulls and forwarding jobs (their
        state is in the index, so whatever a crash interrupted goes on from here)."""
        from gateway.forward.tasks import forward
        from gateway.transfers.tasks import transfer_pull

        budget = self.settings.resume_interval

        def resume(context: Any) -> None:
            transfer_pull(context, budget=budget)
            forward(context, budget=budget)

        self._run_periodically(budget, "resuming pulls and forwards", resume)

    def _audit_periodically(self) -> None:
        """Without a broker: signed audit checkpoints (and syslog shipping)."""
        from gateway.tasks.audit import audit_checkpoint

        interval = self.settings.audit_checkpoint_interval
        self._run_periodically(interval, "audit checkpoint", audit_checkpoint)

    def _run_periodically(self, interval: float, what: str, job: Any) -> None:
        """Run ``job(TaskContext)`` every ``interval`` seconds until stopping, on a
        fresh archive each time; a failure is logged and retried next interval."""
        from gateway.archive import Archive
        from gateway.tasks.registry import TaskContext

        settings = self.settings
        while not self.stopping.wait(interval):
            try:
                archive = Archive.open(settings)
                try:
                    job(TaskContext(archive, settings))
                finally:
                    archive.close()
            except Exception:
                log.exception("%s failed; trying again next interval", what)

    def _on_signal(self, _signum: int, _frame: Any) -> None:
        # A flag only, no lock: the handler runs in the main thread between two of its
        # bytecodes, which may be inside Event.wait or Event.set holding the Event's
        # lock, and setting the Event here then waited for that lock forever (a
        # second SIGTERM arriving during the first one's Event.set hung the parent).
        self._signalled = True

    def _stop_requested(self) -> bool:
        """Whether to stop (main thread): a signal came, or something else stopped."""
        if self._signalled and not self.stopping.is_set():
            self.stopping.set()
        return self.stopping.is_set()

    def _stop_children(self) -> None:
        for proc, _ready in self.children.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + 5
        for proc, _ready in self.children.values():
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc, _ready in self.children.values():
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def refuse_demo_data(settings: Settings) -> None:
    """A production configuration never serves the demo's synthetic data."""
    if settings.profile != "production":
        return
    from gateway.archive import Archive
    from gateway.demo.seed import DemoRefused, refuse_in_production

    archive = Archive.open(settings)
    try:
        refuse_in_production(settings, archive)
    except DemoRefused as exc:
        raise SystemExit(f"refusing to start: {exc}") from exc
    finally:
        archive.close()


def serve(settings: Settings, say: Callable[[str], None] = print) -> int:
    setup_logging(settings.log_level, settings.log_format)
    # Before any child starts: metrics from every process, added up at /metrics.
    prepare_multiprocess(settings.metrics_dir)
    if settings.effective_accept_unknown_peers:
        say(
            "WARNING: accepting associations from any calling AE title "
            f"(profile={settings.profile}); register peers for real use"
        )
    return Supervisor(settings, say).run()
