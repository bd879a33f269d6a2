"""Running DVC (or any command) with its output streamed, line by line, into the run's log.

``run_streaming`` runs a command in its own process group, hands every output line to a log
function (``run_log()``: the current Prefect run's logger) and kills the whole group on timeout or
interruption; ``run_dvc`` runs a short ``dvc`` command with its output captured instead.

Prefect is imported only inside ``run_log`` and ``prefect_env``, which run inside flow runs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.errors import StageFailedError, StageTimeoutError

PathLike = str | Path
LogFn = Callable[[int, str], None]  # (logging level, line)


# ---------------------------------------------------------------------------------------------
# The dvc executable and the environment of its stages


def dvc_exe() -> str:
    """The ``dvc`` next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    if local.exists():
        return str(local)
    found = shutil.which("dvc")
    if not found:
        raise FileNotFoundError("dvc is not installed: run scripts/setup.sh (or pip install dvc)")
    return found


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and its stages: the venv's bin first, unbuffered Python output."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "true")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_dvc(args: Sequence[str], cwd: PathLike, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``dvc <args>`` run to the end with its output captured (for ``--json`` answers and short commands)."""
    return subprocess.run([dvc_exe(), *args], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Streaming a command's output


@dataclass
class StreamResult:
    """What a streamed command did: exit code, last lines, stages DVC ran, wall time."""

    cmd: list[str]
    returncode: int
    tail: list[str] = field(default_factory=list)
    ran_stages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timed_out: bool = False
    restored_stages: list[str] = field(default_factory=list)  # outputs restored from DVC's run cache

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def error_text(self, what: str) -> str:
        last = "\n".join(self.tail[-20:]) or "(no output)"
        if self.timed_out:
            return f"{what} timed out after {self.seconds:.0f} s and was killed. Last output:\n{last}"
        return f"{what} failed with exit code {self.returncode}. Last output:\n{last}"

    def raise_on_failure(self, what: str) -> StreamResult:
        """Raise StageTimeoutError (timed out) or StageFailedError (non-zero exit) naming ``what``."""
        if not self.ok:
            err = StageTimeoutError if self.timed_out else StageFailedError
            raise err(self.error_text(what))
        return self


# DVC's own lines that say what it did with a stage.
_RUNNING = re.compile(r"^Running stage '([^']+)'")
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run")


def _line_level(line: str) -> int:
    head = line.lstrip()[:12].upper()
    if head.startswith("ERROR"):
        return logging.ERROR
    if head.startswith("WARNING"):
        return logging.WARNING
    return logging.INFO


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the command's process group (DVC and the stage it runs), SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    except ProcessLookupError:
        pass


def run_streaming(
    cmd: Sequence[str],
    cwd: PathLike,
    log: LogFn | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    tail_lines: int = 40,
) -> StreamResult:
    """Run ``cmd``, passing each output line (stdout and stderr merged) to ``log(level, line)``.

    The command runs in its own process group; on timeout, or when the caller is interrupted
    (Prefect cancelling the run), the whole group is terminated.
    """
    log = log or (lambda level, line: logging.getLogger("flows").log(level, line))
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), cwd=str(cwd), env=dict(env) if env is not None else child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace", bufsize=1, start_new_session=True,
    )
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, on_timeout) if timeout and timeout > 0 else None
    tail: deque[str] = deque(maxlen=tail_lines)
    ran: list[str] = []
    restored: list[str] = []
    try:
        if timer:
            timer.daemon = True
            timer.start()
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            tail.append(line)
            for pattern, found in ((_RUNNING, ran), (_RESTORED, restored)):
                m = pattern.match(line)
                if m:
                    found.append(m.group(1))
            log(_line_level(line), line)
        rc = proc.wait()
    except BaseException:
        _kill_group(proc, grace=5.0)
        raise
    finally:
        if timer:
            timer.cancel()
    return StreamResult(list(cmd), rc, list(tail), ran, time.monotonic() - start, timed_out.is_set(), restored)


# ---------------------------------------------------------------------------------------------
# Where the lines go: the Prefect run


def run_log() -> LogFn:
    """``log(level, line)`` into the current Prefect run's log (plain logging outside a run)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("flows")
    return logger.log


def prefect_env() -> dict[str, str]:
    """Prefect ids for the stage's environment (``D2V_PREFECT_*``), so stages may tag their runs."""
    try:
        from prefect.runtime import deployment, flow_run

        env = {"D2V_PREFECT_FLOW_RUN_ID": str(flow_run.id or ""), "D2V_PREFECT_FLOW_RUN_NAME": str(flow_run.name or ""),
               "D2V_PREFECT_DEPLOYMENT": str(deployment.name or "")}
    except Exception:  # noqa: BLE001 - outside a run there is nothing to add
        return {}
    return {k: v for k, v in env.items() if v and v != "None"}
