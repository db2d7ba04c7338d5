"""recap-serve's websocket server: one policy behind openpi's protocol (:mod:`recap_ros.serve.protocol`).

* One model, requests served one at a time in arrival order (one inference thread; the event loop keeps
  accepting connections, handshakes and pings meanwhile); any number of clients may connect.
* Every bad request (malformed or oversized frame, text frame, unknown key, wrong shape or dtype, NaN state, bad
  β / seed / steps) gets one text frame naming the problem; the connection stays open and usable, the server
  keeps running. Frames above ``max_request_bytes`` are not decoded. Frames above 4 x that are not even read:
  the websocket library closes that one connection (code 1009, message too big).
* ``api_key``: the websocket handshake must carry ``Authorization: Api-Key <key>`` (what ``openpi-client``
  sends); any other or no key gets HTTP 401 and no connection. ``GET /healthz`` answers ``OK`` (openpi's health
  check) without a key.
* TLS (wss) with an :class:`ssl.SSLContext`.
"""
from __future__ import annotations

import asyncio
import hmac
import http
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from recap_ros.policy.errors import PolicyError
from recap_ros.serve.protocol import (ProtocolError, camera_keys, decode_observation, encode_reply, metadata,
                                      packb)

HARD_LIMIT_FACTOR = 4  # frames above max_request_bytes x this close the connection unread


class PolicyService:
    """Decode -> infer -> encode for one policy (the runtime contract plus ``config.image_resize``)."""

    def __init__(self, policy, max_request_bytes: int, default_prompt: str | None = None, log=print):
        self.policy, self.max_request_bytes, self.default_prompt, self.log = (policy, int(max_request_bytes),
                                                                             default_prompt, log)
        self.keys = camera_keys(policy.info.camera_roles)
        self.metadata_frame = packb(metadata(policy.info, policy.config.image_resize, max_request_bytes))
        self.requests = self.errors = 0
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="recap-serve-infer")  # one model, FIFO

    def respond(self, frame, prev_total_ms: float | None) -> bytes | str:
        """The reply to one request frame: a msgpack reply, or the error text (sent as a text frame)."""
        self.requests += 1
        try:
            if len(frame) > self.max_request_bytes:
                raise ProtocolError(f"request of {len(frame)} bytes exceeds this server's limit of "
                                    f"{self.max_request_bytes} bytes")
            args = decode_observation(frame, self.keys, self.default_prompt)
            t0 = time.perf_counter()
            actions = self.policy.infer(**args)
            return encode_reply(actions, (time.perf_counter() - t0) * 1e3, prev_total_ms)
        except (ProtocolError, PolicyError) as e:
            error = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a request never takes the server down
            self.log(traceback.format_exc())
            error = f"internal error: {type(e).__name__}: {e}"
        self.errors += 1
        self.log(f"request refused: {error}")
        return error

    async def handler(self, ws) -> None:
        peer = ws.remote_address
        self.log(f"client {peer} connected")
        loop = asyncio.get_running_loop()
        prev_total_ms = None
        try:
            await ws.send(self.metadata_frame)
            async for frame in ws:
                t0 = time.monotonic()
                await ws.send(await loop.run_in_executor(self._infer, self.respond, frame, prev_total_ms))
                prev_total_ms = (time.monotonic() - t0) * 1e3
        except ConnectionClosed:
            pass
        self.log(f"client {peer} disconnected")

    def close(self) -> None:
        self._infer.shutdown(wait=True, cancel_futures=True)


def _process_request(api_key: str | None):
    expected = f"Api-Key {api_key}".encode() if api_key else None

    def process_request(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        return None

    return process_request


async def run_server(service: PolicyService, host: str, port: int, stop: asyncio.Event, *,
                     api_key: str | None = None, ssl_context=None, ready=None) -> None:
    """Serve until ``stop`` is set; ``ready(url)`` once listening (port 0: the port the system chose)."""
    async with serve(service.handler, host, port, ssl=ssl_context, compression=None,
                     max_size=service.max_request_bytes * HARD_LIMIT_FACTOR,
                     process_request=_process_request(api_key)) as server:
        bound = server.sockets[0].getsockname()
        if ready is not None:
            ready(f"{'wss' if ssl_context else 'ws'}://{f'[{host}]' if ':' in host else host}:{bound[1]}")
        await stop.wait()
