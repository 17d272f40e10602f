"""One selector over the sockets of many paho clients, plus a wake-up pair for other threads.

paho's external-loop API (`socket()`, `loop_read()`, `loop_write()`, `loop_misc()`,
`want_write()` and the `on_socket_*` callbacks) lets one thread serve every simulated device:
1,000 devices cost one thread, not 1,000 paho network threads.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from .device import SimDevice

log = logging.getLogger(__name__)


class PahoSelector:
    """Readiness for many paho clients; every method runs on the loop thread except wake()."""

    def __init__(self, lost: Callable[[SimDevice, str], None]) -> None:
        """`lost` is told about a device whose network handling failed (it reconnects)."""
        self._lost = lost
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r.fileno(), selectors.EVENT_READ, None)
        self._write_fds: set[int] = set()
        self._dirty: set[mqtt.Client] = set()  # clients with packets to write
        self._close_lock = threading.Lock()
        self.closed = False

    def attach(self, client: mqtt.Client) -> None:
        """Let this selector watch the client's sockets (its userdata is its SimDevice)."""
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    def select(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait up to timeout seconds for a socket to be ready or a wake()."""
        return self._sel.select(timeout)

    def handle(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """Read and write what select() reported."""
        for key, mask in events:
            client = key.data
            if client is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            assert isinstance(client, mqtt.Client)
            self._service(client, mask)

    def wake(self) -> None:
        """Make a select() in progress return (from any thread)."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _service(self, client: mqtt.Client, mask: int) -> None:
        """Read and write one client's socket as the selector reported."""
        dev = client.user_data_get()
        assert isinstance(dev, SimDevice)
        try:
            if mask & selectors.EVENT_READ and dev.client is client:
                client.loop_read()
            # A callback of the read may have dropped the connection: check again.
            if mask & selectors.EVENT_WRITE and dev.client is client:
                client.loop_write()
                if not client.want_write():
                    self._unwatch_write(client)
        except Exception:
            log.exception("%s: network handling failed; reconnecting", dev.device_id)
            if dev.client is client:
                self._lost(dev, "internal error")

    def flush(self) -> None:
        """Write what paho queued; watch for writability only where the socket is full."""
        dirty, self._dirty = self._dirty, set()
        for client in dirty:
            sock = client.socket()
            if sock is None:
                continue
            try:
                client.loop_write()
            except Exception:
                dev = client.user_data_get()
                assert isinstance(dev, SimDevice)
                log.exception("%s: write failed; reconnecting", dev.device_id)
                if dev.client is client:
                    self._lost(dev, "internal error")
                continue
            if client.want_write() and client.socket() is not None:
                fd = sock.fileno()
                if fd not in self._write_fds:
                    self._sel.modify(fd, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                    self._write_fds.add(fd)

    def _unwatch_write(self, client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is None:
            return
        fd = sock.fileno()
        if fd in self._write_fds:
            self._write_fds.discard(fd)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(fd, selectors.EVENT_READ, client)

    def forget(self, client: mqtt.Client) -> None:
        """Unregister and close the client's socket without telling paho: an ungraceful drop."""
        self._dirty.discard(client)
        sock = client.socket()
        if sock is None:
            return
        fd = sock.fileno()
        self._write_fds.discard(fd)
        if not self.closed:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
        with contextlib.suppress(OSError):
            sock.close()

    def close(self) -> None:
        """Release the selector and the wake-up pair (idempotent)."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- paho's socket callbacks (loop thread); identity checks ignore discarded clients --

    def _on_socket_open(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        if dev.client is client:
            self._sel.register(sock.fileno(), selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        if dev.client is client:
            fd = sock.fileno()
            self._write_fds.discard(fd)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)

    def _on_socket_register_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        # Written at the end of the loop turn; the selector watches writability only if the
        # socket buffer is full then, which saves an epoll_ctl pair per burst.
        if dev.client is client:
            self._dirty.add(client)

    def _on_socket_unregister_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        if dev.client is client:
            self._unwatch_write(client)


def raise_fd_limit(need: int) -> None:
    """Each device holds a socket; lift the soft descriptor limit toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            log.warning("descriptor limit %d is below the %d this simulation needs", hard, need)
