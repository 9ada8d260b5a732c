"""A TCP proxy on 127.0.0.1 in front of the S3 server that the tests turn into a failing network.

Every byte goes through it, unchanged, until a request line from the client matches `trigger` (a regular
expression over the bytes, e.g. the PUT of a checkpoint's manifest); then the proxy
    hold    keeps that request from the server forever (the upload hangs: the moment to kill -9), or
    refuse  drops that connection and every connection from then on (a network that stays down),
and sets `triggered`.  `passthrough()` heals it.  Bounded: threads are daemons, sockets time out.
"""
from __future__ import annotations

import re
import socket
import threading


class FaultProxy:
    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.mode, self.trigger = "pass", None
        self.triggered = threading.Event()
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str, trigger: str) -> None:
        """From now on, a request matching `trigger` makes the proxy `hold` or `refuse`."""
        with self._lock:
            self.mode, self.trigger = f"armed-{mode}", re.compile(trigger.encode())
            self.triggered.clear()

    def passthrough(self) -> None:
        with self._lock:
            self.mode, self.trigger = "pass", None

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()
        self._pipe(client, server, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if from_client and self._judge(data) in ("hold", "refuse"):
                    if self.mode == "hold":
                        self._hold(src)
                    return
                if self.mode == "refuse":
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def _judge(self, data: bytes) -> str:
        with self._lock:
            for line in re.findall(rb"(?:GET|PUT|POST|HEAD|DELETE) \S+ HTTP/1\.1", data):
                self.requests.append(line)
            if self.trigger is not None and self.mode.startswith("armed-") and self.trigger.search(data):
                self.mode = self.mode.removeprefix("armed-")
                self.triggered.set()
            return self.mode

    @staticmethod
    def _hold(sock: socket.socket) -> None:
        """Read and drop what the client sends, answer nothing (until the client is killed, at most 10 min)."""
        sock.settimeout(600)
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass
