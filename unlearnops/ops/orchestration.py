"""Prefect plumbing shared by the flows: a server to schedule on, and deployments to work pools.

Prefect 3 runs flows without a server (its ephemeral mode), but it does not schedule runs
there: scheduling is a service of a real server. `prefect_api()` uses PREFECT_API_URL when it
is set (a shared server) and otherwise starts `prefect server start` on a free local port,
with its SQLite database under `home`, for as long as the context is open.

`deploy()` registers a flow of this checkout with a work pool (params.yaml `ops.work_pool`) on
the server of PREFECT_API_URL; a worker of that pool runs it in the same checkout path.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx


def _die_with_parent() -> None:
    """In a child process (preexec_fn): get SIGTERM when the parent dies, even by kill -9 (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def bind_ephemeral_server() -> None:
    """Make the temporary server Prefect starts without PREFECT_API_URL die with this process.

    Prefect stops it at exit (atexit), which a killed process never reaches; the server would
    run on. Its Popen gets a preexec_fn that asks Linux to SIGTERM it when its parent dies."""
    import subprocess as subprocess_module

    from prefect.server.api import server as server_module

    cls = server_module.SubprocessASGIServer
    if getattr(cls, "_unlearnops_bound", False):
        return
    original = cls._run_uvicorn_command

    def run_bound(self):
        real_popen = subprocess_module.Popen

        def popen(*args, **kwargs):
            kwargs.setdefault("preexec_fn", _die_with_parent)
            return real_popen(*args, **kwargs)

        server_module.subprocess.Popen = popen
        try:
            return original(self)
        finally:
            server_module.subprocess.Popen = real_popen

    cls._run_uvicorn_command = run_bound
    cls._unlearnops_bound = True


class _OneLine(logging.Filter):
    """Log records without tracebacks, first line only: the CLI prints the error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = str(record.getMessage()).splitlines()[0] if record.getMessage() else "", None
        return True


@contextmanager
def quiet_tracebacks() -> Iterator[None]:
    """While open, Prefect's log handlers print no tracebacks (the caller reports the error)."""
    handlers = set(logging.getLogger().handlers)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("prefect"):
            handlers |= set(logging.getLogger(name).handlers)
    one_line = _OneLine()
    for handler in handlers:
        handler.addFilter(one_line)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(one_line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_api(home: str | Path = ".prefect", startup_timeout_s: float = 180.0) -> Iterator[str]:
    """Yield the API URL flows talk to (a server started here is stopped on exit)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(Path(home).resolve()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"`prefect server start` exited with code {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not answer at {url} within {startup_timeout_s:.0f} s")
            time.sleep(1)
        print(f"local Prefect server: UI http://127.0.0.1:{port}, data in {Path(home).resolve()}; "
              "it stops when serving stops")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        stop_process(server)


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def deploy(flow, entrypoint: str, name: str, work_pool: str, **options) -> str:
    """Deploy `entrypoint` (path:function, relative to the working directory) of this checkout
    to `work_pool`; options go to Prefect's `deploy` (parameters, interval/cron, ...).
    Returns the deployment id."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError("set PREFECT_API_URL to the Prefect server the work pool's workers poll "
                           "(a deployment on the ephemeral API would vanish with it)")
    source = flow.from_source(source=str(Path.cwd()), entrypoint=entrypoint)
    return str(source.deploy(name=name, work_pool_name=work_pool, print_next_steps=False, **options))
