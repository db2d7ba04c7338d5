"""``recap-serve <bundle>``: serve a policy bundle over openpi's websocket protocol (GPU server for robot PCs).

    recap-serve sim_policy                                   # ws://127.0.0.1:8000, no key
    RECAP_API_KEY=... recap-serve /models/pi06 --host 0.0.0.0 --api-key-env RECAP_API_KEY \\
        --certfile server.crt --keyfile server.key           # wss://<this machine>:8000, key required

Clients: ``openpi_client.websocket_client_policy.WebsocketClientPolicy(host, port, api_key)`` or a station
with ``policy.backend: remote``. Prints ``recap-serve: serving <bundle> on <url>`` once it accepts connections
(port 0: the port the system chose); SIGINT / SIGTERM stop it. Exit code 2 on a configuration error.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
import time

from recap_ros.policy.errors import PolicyError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _log(text: str) -> None:
    print(f"recap-serve: {text}", file=sys.stderr, flush=True)


def _parse(argv):
    ap = argparse.ArgumentParser(prog="recap-serve",
                                 description="Serve a policy bundle over openpi's websocket protocol.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("bundle", help="bundle name under models/ or a path")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the torch / onnxruntime backend")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (default 8000, openpi's; 0: any free port)")
    ap.add_argument("--api-key-env", metavar="VAR",
                    help="require 'Authorization: Api-Key <key>' with the key read from environment variable VAR")
    ap.add_argument("--certfile", help="TLS certificate chain (PEM): serve wss://")
    ap.add_argument("--keyfile", help="TLS private key (PEM; default: in --certfile)")
    ap.add_argument("--max-request-mb", type=float, default=32.0,
                    help="largest request decoded (MiB); larger ones get an error frame (default 32)")
    ap.add_argument("--default-prompt", help="prompt for observations that carry none (default: refuse them)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        api_key = None
        if args.api_key_env:
            api_key = os.environ.get(args.api_key_env, "")
            if not api_key:
                raise PolicyError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
        ssl_context = None
        if args.certfile:
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                ssl_context.load_cert_chain(args.certfile, args.keyfile)
            except (OSError, ssl.SSLError) as e:
                raise PolicyError(f"--certfile {args.certfile}: cannot load the certificate / key ({e})") from None
        elif args.keyfile:
            raise PolicyError("--keyfile needs --certfile")
        if args.max_request_mb <= 0:
            raise PolicyError(f"--max-request-mb {args.max_request_mb}: must be > 0")
        if args.host not in LOCAL_HOSTS and api_key is None:
            _log(f"WARNING: listening on {args.host} without --api-key-env: anyone who reaches this port can "
                 "drive the model")
        from recap_ros.policy import load_policy
        from recap_ros.serve.server import PolicyService

        t0 = time.monotonic()
        policy = load_policy(args.bundle, backend=args.backend, threads=args.threads)
        info = policy.info
        service = PolicyService(policy, int(args.max_request_mb * 2**20), args.default_prompt, log=_log)
        _log(f"loaded {info.name} ({info.bundle_id}) on {info.backend} / {info.device} in "
             f"{time.monotonic() - t0:.1f} s: chunk {info.chunk_len} x {info.action_dim}, views "
             f"{', '.join(service.keys)} at {info.image_size} px")
    except PolicyError as e:
        _log(str(e))
        return 2
    return asyncio.run(_serve(service, args, api_key, ssl_context, info.name))


async def _serve(service, args, api_key, ssl_context, name: str) -> int:
    from recap_ros.serve.server import run_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_server(service, args.host, args.port, stop, api_key=api_key, ssl_context=ssl_context,
                         ready=lambda url: _log(f"serving {name} on {url}"
                                                + (" (API key required)" if api_key else "")))
    except OSError as e:
        _log(f"cannot listen on {args.host}:{args.port}: {e}")
        return 2
    finally:
        service.close()
    _log(f"stopped after {service.requests} requests ({service.errors} refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
