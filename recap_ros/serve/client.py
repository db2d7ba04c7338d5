"""policy_server's ``remote`` backend: the policy runtime contract (``info``, ``check_station``, ``infer``) over
openpi's websocket protocol, served by ``recap-serve`` on another machine (ROS-free).

:class:`RemotePolicy` connects at construction (waiting up to ``wait_s`` for the server) and builds its
``info`` from the server's handshake metadata, so ``check_station`` checks the served model against the station
as for a local bundle. ``infer`` fits the views to the model's input size here (what the server would do, so the
chunk is the same; openpi's clients resize before sending too) and sends them as CHW, then waits at most
``request_timeout_s`` for the reply. The returned actions are not trusted: they go through the same chunk
validation as a local model's (shape, finite values in :func:`recap_ros.control.stitching.validate_chunk`,
joint and velocity limits in the executor's safety stage), and their round trip is part of the inference time
that the delay-aware stitching measures (a chunk starts at index d = ticks since its observation).

Failures raise :class:`PolicyError` (policy_server holds and reports it on /diagnostics): a lost connection, no
reply in time (the connection is dropped: a late reply must not be taken for the next request's), a server error
frame (the connection stays). A lost connection is re-opened on a later call; after a failed attempt the next
waits 0.5 s, doubling up to 5 s, and calls before then fail at once. A server that comes back with another
model (bundle id) is refused until policy_server restarts.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import connect

from recap_ros import imaging
from recap_ros.policy.errors import PolicyError
from recap_ros.policy.runtime import check_station
from recap_ros.serve.protocol import (ProtocolError, decode_reply, encode_observation, parse_metadata,
                                      unpackb)

BACKOFF_S = (0.5, 5.0)          # first wait after a failed connection attempt, the most it doubles to
CONNECT_TIMEOUT_S = 3.0         # TCP + TLS + websocket handshake + metadata frame
MAX_REPLY_BYTES = 4 * 2**20     # a chunk is kilobytes; a larger frame closes the connection


def _why(e: BaseException) -> str:
    if isinstance(e, InvalidStatus):
        code = e.response.status_code
        return f"HTTP {code}" + (" (missing or wrong API key)" if code == 401 else "")
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class RemotePolicy:
    def __init__(self, url: str, api_key: str | None = None, *, request_timeout_s: float = 5.0,
                 wait_s: float = 30.0, log=None):
        if not url.startswith(("ws://", "wss://")):
            raise PolicyError(f"remote policy server '{url}': expected a ws:// or wss:// URL")
        self.url, self.request_timeout_s = url, float(request_timeout_s)
        self._headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._ws = None
        self._backoff, self._retry_at = BACKOFF_S[0], 0.0
        self.server_timing: dict = {}
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._ws, (self.info, self.image_keys, self.image_resize, self._max_bytes) = self._open()
                break
            except PolicyError as e:
                if time.monotonic() + self._backoff > deadline:
                    raise PolicyError(f"{e} (gave up after {wait_s:g} s)") from None
                if log is not None:
                    log(f"{e}; retrying in {self._backoff:g} s")
                time.sleep(self._backoff)
                self._backoff = min(2 * self._backoff, BACKOFF_S[1])
        self._backoff = BACKOFF_S[0]

    def _open(self):
        """A new connection and its parsed handshake metadata; PolicyError naming why not."""
        ws = None
        try:
            ws = connect(self.url, additional_headers=self._headers, compression=None, max_size=MAX_REPLY_BYTES,
                         open_timeout=CONNECT_TIMEOUT_S, close_timeout=1.0, legacy=True)  # a long-lived connection
            return ws, parse_metadata(unpackb(ws.recv(timeout=CONNECT_TIMEOUT_S)), self.url)
        except (OSError, TimeoutError, WebSocketException, ProtocolError) as e:
            if ws is not None:
                ws.close()
            raise PolicyError(f"remote policy server {self.url}: cannot connect ({_why(e)})") from None

    def _connection(self):
        if self._ws is not None:
            return self._ws
        now = time.monotonic()
        if now < self._retry_at:
            raise PolicyError(f"remote policy server {self.url}: not connected; next attempt in "
                              f"{self._retry_at - now:.1f} s")
        try:
            ws, (info, _, _, limit) = self._open()  # same bundle id: same cameras and resize
            if info.bundle_id != self.info.bundle_id:
                ws.close()
                raise PolicyError(f"remote policy server {self.url} now serves bundle {info.name} ({info.bundle_id}), "
                                  f"not {self.info.name} ({self.info.bundle_id}): restart policy_server to use it")
        except PolicyError as e:
            self._retry_at = now + self._backoff
            self._backoff = min(2 * self._backoff, BACKOFF_S[1])
            raise PolicyError(f"{e}; next attempt in {self._retry_at - now:.1f} s") from None
        self._ws, self._max_bytes, self._backoff = ws, limit, BACKOFF_S[0]
        return ws

    def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()

    def check_station(self, station) -> None:
        check_station(self.info, station)

    def infer(self, images, state, prompt: str, beta: float = 1.0, seed: int = 0, steps: int | None = None,
              advantage: bool = True) -> np.ndarray:
        """One chunk from the server (runtime contract); the caller validates it like a local model's."""
        size = self.info.image_size
        views = [imaging.fit(np.asarray(img), size, size, self.image_resize) for img in images]
        frame = encode_observation(views, self.image_keys, state, prompt, beta=beta, seed=seed, denoise_steps=steps,
                                   advantage=advantage)
        if len(frame) > self._max_bytes:
            raise PolicyError(f"request of {len(frame)} bytes exceeds the server's limit of {self._max_bytes}")
        ws = self._connection()
        try:
            ws.send(frame)
            reply = ws.recv(timeout=self.request_timeout_s)
        except TimeoutError:
            self._drop()
            raise PolicyError(f"remote policy server {self.url}: no reply within {self.request_timeout_s:g} s; "
                              "reconnecting") from None
        except (OSError, WebSocketException) as e:
            self._drop()
            raise PolicyError(f"remote policy server {self.url}: connection lost ({_why(e)}); reconnecting") from None
        try:
            actions, self.server_timing = decode_reply(reply)
        except ProtocolError as e:
            raise PolicyError(f"remote policy server {self.url}: {e}") from None
        return np.asarray(actions, dtype=np.float64)

    def close(self) -> None:
        self._drop()


def connect_remote(section, bundle: str, log=None) -> RemotePolicy:
    """The remote policy of a station's ``policy`` section: ``server``, the API key from the environment variable
    ``api_key_env`` names; the server must serve the bundle the station names (``bundle``, by name)."""
    if not section.server:
        raise PolicyError("backend remote needs policy.server (ws://host:port or wss://host:port) in the station")
    key = None
    if section.api_key_env:
        key = os.environ.get(section.api_key_env)
        if not key:
            raise PolicyError(f"policy.api_key_env: environment variable {section.api_key_env} is not set or empty")
    policy = RemotePolicy(section.server, key, log=log)
    if policy.info.name != Path(bundle).name:
        policy.close()
        raise PolicyError(f"policy.bundle is '{bundle}' but {section.server} serves '{policy.info.name}' "
                          f"({policy.info.bundle_id})")
    return policy
