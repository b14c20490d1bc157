"""Helpers shared by the benchmarks: loopback ports, managed server processes, RSS sampling.

Nothing here knows about DICOM. Every process a benchmark starts goes through
``Processes`` so that it is stopped at the end, also on Ctrl-C or an exception.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
MB = 1_000_000  # figures are in decimal megabytes


# --- ports -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def wait_for_port(
    port: int, proc: subprocess.Popen, timeout: float, log: Path | None = None
) -> None:
    """Wait until 127.0.0.1:port accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}{log_tail(log)}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout:.0f} s{log_tail(log)}")


def wait_for_line(text: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait until ``log`` holds ``text`` (a server saying it is ready); fail early if
    ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}{log_tail(log)}")
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no {text!r} after {timeout:.0f} s{log_tail(log)}")


def log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(tail)


# --- processes ---------------------------------------------------------------------------


class Processes:
    """Starts server processes in their own process group and stops every one of them.

    Use as a context manager; ``stop`` ends one server (SIGTERM, then SIGKILL to
    its group after ``grace`` seconds), leaving the context stops whatever is left.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,  # own process group: forked children die with it
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 30.0) -> int | None:
        """SIGTERM the process, wait up to ``grace`` s, then SIGKILL its whole group.

        Returns the exit code after SIGTERM, or None when it had to be killed.
        """
        code: int | None = proc.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                code = None
        # Whatever is left in the group (forked children, workers) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc in self._procs:
            self._procs.remove(proc)
        return code

    def stop_all(self) -> None:
        for proc in list(reversed(self._procs)):
            self.stop(proc, grace=10.0)


# --- memory ------------------------------------------------------------------------------


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants, found by scanning /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in KiB, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0])
    if "VmRSS" not in values:  # a zombie has no memory lines
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current VmRSS (``echo 5 > clear_refs``, Linux >= 4.0)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class RssResult:
    processes: int
    baseline_mb: float
    hwm_growth_mb: float  # sum over processes of (VmHWM - baseline): an upper bound
    sampled_growth_mb: float  # largest growth of the tree's summed VmRSS seen by sampling

    @property
    def growth_mb(self) -> float:
        return max(self.hwm_growth_mb, self.sampled_growth_mb)


@dataclass
class RssWatch:
    """Samples the VmRSS/VmHWM of a process and its descendants every ``interval`` s.

    ``start`` takes the baseline (and resets each process's VmHWM), ``stop`` returns
    the growth over it. A process that appears later (a forked child) takes its
    first observed VmRSS as its baseline, since it starts out sharing its parent's pages.
    """

    root: int
    interval: float = 0.02
    rescan_every: int = 10  # rescan /proc for new descendants every N samples
    _base: dict[int, int] = field(default_factory=dict)
    _hwm: dict[int, int] = field(default_factory=dict)
    _peak_growth: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        for pid in process_tree(self.root):
            reset_peak(pid)
            mem = memory_kb(pid)
            if mem:
                self._base[pid] = mem[0]
                self._hwm[pid] = mem[0]
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pids = list(self._base)
        n = 0
        while not self._stop.is_set():
            if n % self.rescan_every == 0:
                pids = process_tree(self.root)
            self._sample(pids)
            n += 1
            self._stop.wait(self.interval)
        self._sample(process_tree(self.root))

    def _sample(self, pids: list[int]) -> None:
        growth = 0
        for pid in pids:
            mem = memory_kb(pid)
            if mem is None:
                continue
            rss, hwm = mem
            base = self._base.setdefault(pid, rss)
            self._hwm[pid] = max(self._hwm.get(pid, 0), hwm, rss)
            growth += rss - base
        self._peak_growth = max(self._peak_growth, growth)

    def stop(self) -> RssResult:
        self._stop.set()
        if self._thread:
            self._thread.join()
        hwm_growth = sum(max(0, self._hwm[p] - self._base[p]) for p in self._base)
        return RssResult(
            processes=len(self._base),
            baseline_mb=sum(self._base.values()) * 1024 / MB,
            hwm_growth_mb=hwm_growth * 1024 / MB,
            sampled_growth_mb=self._peak_growth * 1024 / MB,
        )


# --- figures and machine -----------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` 0-100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats' surprises
    return ordered[int(rank) - 1]


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (others may be using the machine)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


# --- deleted files -----------------------------------------------------------------------
# ext4 without a journal (this machine's root file system: /proc/fs/jbd2 lists no device)
# does not reuse an inode freed less than 60 s ago (300 s while its inode table block is
# unwritten): every file created meanwhile first steps over each such inode of its block
# group, one buffer lookup each (Linux fs/ext4/ialloc.c: find_inode_bit, recently_deleted).
# Right after a run's thousand files were deleted, the next run's receiver spent about
# 0.5 ms of kernel CPU on each file it created (receive_cpu.py: 550 us per staging file,
# against 43 us with nothing deleted), a cost of the benchmark, not of the receiver. So
# the benchmarks keep their runs' files until they end, and one that starts less than a
# minute after a benchmark deleted files waits first.
_DELETED_STAMP = Path(tempfile.gettempdir()) / "studybridge-bench-deleted-files"
_RECENT_DELETION_S = 62.0


def remove_tree(path: Path) -> None:
    """Delete ``path`` and write the freed inodes back (``sync``: 60 s, not 300, until
    the kernel reuses them); later benchmarks wait for them (``wait_out_deletions``)."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    with contextlib.suppress(OSError):
        _DELETED_STAMP.write_text(f"{time.time()}\n")


def wait_out_deletions() -> None:
    """Wait until files a benchmark deleted are past the kernel's reuse delay."""
    try:
        since = time.time() - float(_DELETED_STAMP.read_text())
    except (OSError, ValueError):
        return
    if 0 <= since < _RECENT_DELETION_S:
        wait = _RECENT_DELETION_S - since
        print(
            f"waiting {wait:.0f} s: files deleted {since:.0f} s ago would slow every file "
            "creation until the kernel reuses their inodes (see bench/_common.py)",
            flush=True,
        )
        time.sleep(wait)


def drop_page_cache() -> bool:
    """Write back, then drop the clean page cache (``/proc/sys/vm/drop_caches``, root
    only): False when not allowed.

    The runs' files stay on disk (see above), but the memory caching them is given
    back for the next run. On this VM, with the cache kept, the fsyncing targets
    (studybridge, Orthanc) ran 30-40% slower in every repetition after the first;
    dropped, the repetitions agree within a few percent. The likely cause (not
    proven): a run filling memory pages never used before, which the host maps on
    first touch, writes more slowly than one reusing pages a previous run freed.
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def free_bytes(path: Path) -> int:
    """Bytes free for an unprivileged writer on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def apt_install(packages: Sequence[str]) -> None:
    """``apt-get install -y`` the packages, running ``apt-get update`` once if needed."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)
