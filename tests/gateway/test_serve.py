"""``studybridge serve``'s parent process: its periodic jobs' imports."""

from __future__ import annotations

import ast
import inspect

import pytest

from gateway import serve

pytestmark = pytest.mark.fast


def test_every_module_a_periodic_job_imports_is_imported_before_the_threads_start() -> None:
    """The jobs import lazily in their threads; the parent imports the same modules
    first (``PERIODIC_JOB_MODULES``), so no two threads import them at once (which can
    deadlock Python's import system). A job importing a module the list misses fails
    this test."""
    tree = ast.parse(inspect.getsource(serve.Supervisor))
    imported = {
        node.module
        for method in tree.body[0].body
        if isinstance(method, ast.FunctionDef) and method.name.endswith("_periodically")
        for node in ast.walk(method)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported, "no periodic job found"
    assert imported <= set(serve.PERIODIC_JOB_MODULES), imported - set(serve.PERIODIC_JOB_MODULES)


def test_the_listed_modules_import() -> None:
    import importlib

    for module in serve.PERIODIC_JOB_MODULES:
        importlib.import_module(module)


def test_the_signal_handler_takes_no_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The handler may run while the main thread holds the stopping Event's lock (in
    Event.wait or Event.set): it must return at once, and the main thread then stops."""
    import threading

    from gateway.config import Settings

    supervisor = serve.Supervisor(Settings(data_dir=tmp_path / "var"), say=lambda _text: None)
    returned = threading.Event()

    def signal_while_the_lock_is_held() -> None:
        with supervisor.stopping._cond:  # as inside Event.wait / Event.set
            supervisor._on_signal(15, None)
            supervisor._on_signal(15, None)  # a second SIGTERM
        returned.set()

    worker = threading.Thread(target=signal_while_the_lock_is_held, daemon=True)
    worker.start()
    assert returned.wait(5), "the signal handler waited for the stopping Event's lock"
    assert supervisor._stop_requested()
    assert supervisor.stopping.is_set()
