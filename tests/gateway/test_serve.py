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
