"""Serving-process settings: pydicom validation off, the garbage collector tuned."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.fast]


def test_a_serving_process_collects_less_often_and_freezes_its_startup_heap():
    # In a child: the settings are process-wide and would change this test process.
    code = textwrap.dedent(
        """
        import gc
        import pydicom.config
        from gateway.runtime import GC_GEN0_THRESHOLD, configure_serving_process
        from gateway.runtime import freeze_startup_heap
        before = gc.get_threshold()
        configure_serving_process()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:]), gc.get_threshold()
        assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
        assert gc.get_freeze_count() == 0
        freeze_startup_heap()
        assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
