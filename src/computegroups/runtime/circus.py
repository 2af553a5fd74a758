"""A private circus daemon: started on demand, one per runtime folder, controlled over an ``ipc://`` socket.

The daemon (``circusd``) is its own process, detached from whoever started it,
so workers outlive the command that launched them. Its folder holds::

    circus.ini      the daemon's configuration
    circus.sock     control endpoint (ipc, mode 0600, in a 0700 folder)
    pubsub.sock     circus' event socket (ipc, mode 0600)
    circusd.pid     the daemon's pid
    circusd.log     the daemon's log
    daemon.lock     held while starting, so two callers never start two daemons

Multicast discovery is off (``multicast_endpoint`` empty) and no TCP port is
opened. Every circus error reaching this module leaves it as :class:`CircusError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from computegroups.errors import ProviderError

__all__ = ["CircusDaemon", "CircusError", "default_runtime_dir"]

# sun_path holds 108 bytes; ipc:// paths longer than this cannot be bound.
_MAX_SOCKET_PATH = 100


class CircusError(ProviderError):
    """The circus daemon could not be started or refused a command; the message says which and why."""


def default_runtime_dir() -> Path:
    """``$COMPUTEGROUPS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/computegroups``, else ``/tmp/computegroups-<uid>``."""
    explicit = os.environ.get("COMPUTEGROUPS_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "computegroups"
    return Path(f"/tmp/computegroups-{os.getuid()}")


class CircusDaemon:
    """Starts (on demand) and talks to the circus daemon of one runtime folder.

    ``check_delay``: how often circus checks its processes (seconds); small values
    notice exits sooner. Methods are synchronous (zmq round trips); the async
    runtime calls them in a worker thread.
    """

    def __init__(
        self,
        runtime_dir: str | os.PathLike[str] | None = None,
        *,
        check_delay: float = 0.5,
        start_timeout_s: float = 30.0,
        call_timeout_s: float = 30.0,
    ) -> None:
        self.dir = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        self.check_delay = check_delay
        self.start_timeout_s = start_timeout_s
        self.call_timeout_s = call_timeout_s
        sock = self.dir.resolve() / "circus.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            raise CircusError(
                f"runtime dir {self.dir}: socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes; "
                "choose a shorter COMPUTEGROUPS_RUNTIME_DIR"
            )
        self.socket_path = sock
        self.endpoint = f"ipc://{sock}"
        self.pubsub_endpoint = f"ipc://{self.dir.resolve() / 'pubsub.sock'}"
        self.pidfile = self.dir / "circusd.pid"
        self.logfile = self.dir / "circusd.log"

    # -- talking ------------------------------------------------------------------------
    def call(self, command: str, *, timeout_s: float | None = None, **properties: Any) -> dict[str, Any]:
        """Send one command; returns circus' answer. Raises CircusError if it fails or is refused."""
        from circus.client import CircusClient
        from circus.exc import CallError

        for attempt in range(100):
            client = CircusClient(endpoint=self.endpoint, timeout=timeout_s or self.call_timeout_s)
            try:
                answer: dict[str, Any] = client.call({"command": command, "properties": dict(properties)})
            except CallError as exc:
                raise CircusError(f"circus {command}: {exc} (daemon at {self.endpoint})") from exc
            finally:
                client.stop()
            reason = str(answer.get("reason", answer))
            # circus runs one command at a time and refuses the others; ask again shortly.
            if answer.get("status") == "error" and "already running" in reason and attempt < 99:
                time.sleep(0.02)
                continue
            if answer.get("status") == "error":
                raise CircusError(f"circus {command}: {reason}")
            return answer
        raise AssertionError("unreachable")

    def is_running(self) -> bool:
        """Whether a daemon answers on this folder's socket."""
        if not self.socket_path.exists():
            return False
        try:
            self.call("list", timeout_s=2.0)
        except CircusError:
            return False
        return True

    # -- starting -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        fd = os.open(self.dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _prepare_dir(self) -> None:
        """Create the folder 0700, or check that an existing one is a real folder of this user.

        The folder holds the daemon's control socket: a folder someone else made (in a shared
        /tmp, say) could let them drive the workers, so it is refused, never adopted.
        """
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.dir, 0o700)
        except OSError as exc:
            raise CircusError(f"runtime folder {self.dir}: cannot create it: {exc}") from exc
        st = os.lstat(self.dir)
        if not stat.S_ISDIR(st.st_mode):
            raise CircusError(f"runtime folder {self.dir}: not a folder (a link or a file is never followed)")
        if st.st_uid != os.getuid():
            raise CircusError(f"runtime folder {self.dir}: owned by uid {st.st_uid}, not by this user ({os.getuid()})")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.dir, 0o700)

    def _write_config(self) -> Path:
        ini = self.dir / "circus.ini"
        ini.write_text(
            "[circus]\n"
            f"endpoint = {self.endpoint}\n"
            f"pubsub_endpoint = {self.pubsub_endpoint}\n"
            "multicast_endpoint =\n"
            "statsd = false\n"
            "httpd = false\n"
            f"check_delay = {self.check_delay}\n"
            "umask = 077\n"
            f"pidfile = {self.pidfile}\n"
            f"logoutput = {self.logfile}\n"
            "loglevel = info\n"
        )
        os.chmod(ini, 0o600)
        return ini

    def ensure_started(self) -> bool:
        """Start the daemon unless one answers already; returns True if this call started it."""
        self._prepare_dir()
        if self.is_running():
            return False
        with self._start_lock():
            if self.is_running():
                return False
            for stale in (self.socket_path, self.dir / "pubsub.sock"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            ini = self._write_config()
            # --daemon forks twice; the child we wait for exits once the daemon is detached.
            done = subprocess.run(
                [sys.executable, "-m", "circus.circusd", "--daemon", str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                timeout=self.start_timeout_s,
                check=False,
            )
            if done.returncode != 0:
                raise CircusError(f"circusd did not start: exit {done.returncode}: {done.stderr.decode()[-500:]}")
            deadline = time.monotonic() + self.start_timeout_s
            while not self.is_running():
                if time.monotonic() > deadline:
                    raise CircusError(f"circusd did not answer on {self.endpoint}; see {self.logfile}")
                time.sleep(0.05)
            for sock in (self.socket_path, self.dir / "pubsub.sock"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(sock, 0o600)
        return True

    def pid(self) -> int | None:
        """The daemon's pid, from its pidfile."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def quit(self, *, timeout_s: float = 30.0) -> None:
        """Stop every worker gracefully and end the daemon (no-op if none is running)."""
        if not self.is_running():
            return
        pid = self.pid()
        with contextlib.suppress(CircusError):
            self.call("quit", waiting=True, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- watchers -----------------------------------------------------------------------
    def add_watcher(self, name: str, cmd: str, args: list[str], options: dict[str, Any]) -> None:
        """Add a watcher and start it."""
        self.call("add", name=name, cmd=cmd, args=args, options=options, start=True)

    def watchers(self) -> list[str]:
        """Names of all watchers."""
        return list(self.call("list").get("watchers", []))

    def pids(self, name: str) -> list[int]:
        """Live pids of a watcher."""
        return [int(p) for p in self.call("list", name=name).get("pids", [])]

    def status(self, name: str) -> str:
        """``active``, ``stopped``, ``stopping`` or ``starting``."""
        return str(self.call("status", name=name).get("status", "unknown"))

    def restart_watcher(self, name: str) -> None:
        """Start a watcher's processes again (after they ended)."""
        self.call("restart", name=name, waiting=True)

    def remove_watcher(self, name: str) -> None:
        """Stop a watcher's processes gracefully (stop signal, then SIGKILL after graceful_timeout) and remove it."""
        self.call("rm", name=name, waiting=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
