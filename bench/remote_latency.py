"""Remote inference cost: ms per chunk, local backend vs recap-serve over loopback, in one run.

For 3 views of 224² and of 448² (``--sizes``), round-robin (one chunk of each configuration per round, so load
changes on a shared machine hit all alike):

* ``local``: ``policy.infer`` in this process (the station's default path);
* ``remote``: policy_server's ``remote`` backend (:class:`recap_ros.serve.client.RemotePolicy`) against
  ``recap-serve`` (same bundle, backend and threads) on 127.0.0.1: it fits the views to the model's input size
  before sending, as openpi's clients do;
* ``remote, full views``: an openpi-style request that carries the views at full size (CHW uint8); the server
  resizes them.

Prints median / p90 ms per chunk, the added ms (median of the per-round differences to local: both measured
under the same load) and the ratio of the medians, the server's own inference time (``server_timing.infer_ms``),
the overhead (round trip minus that: encoding, transfer, decoding, thread hand-overs, and the resize for full
views) and the bytes per request and reply. Goal: remote adds <= 3 ms at 224².

    python bench/remote_latency.py --duration 10
    python bench/remote_latency.py --bundle tiny --backend torch --threads 1
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
from websockets.sync.client import connect

from recap_ros.policy import load_policy
from recap_ros.serve.client import RemotePolicy
from recap_ros import imaging
from recap_ros.serve.protocol import decode_reply, encode_observation, encode_reply, unpackb

PROMPT = "touch the red marker with the left gripper"
GOAL_MS = 3.0


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "recap_ros.serve.cli", args.bundle, "--backend", args.backend, "--port", "0"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        m = re.search(r"serving \S+ on (ws://\S+)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit(f"recap-serve exited with code {proc.wait()}")


class FullViews:
    """An openpi-style client that sends the views as they are (no resize before sending)."""

    def __init__(self, url: str, keys):
        self.ws = connect(url, compression=None, max_size=None, legacy=True)
        unpackb(self.ws.recv())
        self.keys, self.server_ms = keys, 0.0

    def infer(self, images, state, prompt, seed):
        self.ws.send(encode_observation(images, self.keys, state, prompt, seed=seed))
        actions, timing = decode_reply(self.ws.recv())
        self.server_ms = timing["infer_ms"]
        return actions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="sim_policy")
    ap.add_argument("--backend", default="onnxruntime", choices=("torch", "onnxruntime", "tensorrt"))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the backend, here and in the server")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="view sizes (square)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per configuration (at least 20 chunks)")
    args = ap.parse_args()

    local = load_policy(args.bundle, backend=args.backend, threads=args.threads)
    proc, url = start_server(args)
    try:
        remote = RemotePolicy(url)
        full = FullViews(url, remote.image_keys)
        info = local.info
        print(f"bundle {info.name} ({info.bundle_id}), {info.backend} on {info.device}, model input "
              f"{info.image_size}², chunk {info.chunk_len} x {info.action_dim}; recap-serve at {url}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        rng = np.random.default_rng(0)
        q = np.zeros(info.state_dim)
        calls, requests = {}, {}
        for size in args.sizes:
            views = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in info.camera_roles]
            calls[(size, "local")] = lambda s, v=views: local.infer(v, q, PROMPT, seed=s)
            calls[(size, "remote")] = lambda s, v=views: remote.infer(v, q, PROMPT, seed=s)
            calls[(size, "remote, full views")] = lambda s, v=views: full.infer(v, q, PROMPT, seed=s)
            fitted = [imaging.fit(v, info.image_size, info.image_size, remote.image_resize) for v in views]
            requests[(size, "remote")] = len(encode_observation(fitted, remote.image_keys, q, PROMPT, beta=1.0,
                                                                seed=0, advantage=True))
            requests[(size, "remote, full views")] = len(encode_observation(views, remote.image_keys, q, PROMPT,
                                                                            seed=0))
        times = {k: [] for k in calls}
        server_ms = {k: [] for k in calls}
        for k, call in calls.items():  # warm-up; chunks equal across the three paths
            ref = calls[(k[0], "local")](0)
            assert np.allclose(call(0), ref, rtol=0, atol=1e-9), k
        t_end = time.perf_counter() + args.duration * len(calls)
        i = 0
        while min(len(t) for t in times.values()) < 20 or time.perf_counter() < t_end:
            i += 1
            for k, call in calls.items():
                t0 = time.perf_counter()
                call(i)
                times[k].append((time.perf_counter() - t0) * 1e3)
                if k[1] == "remote":
                    server_ms[k].append(remote.server_timing["infer_ms"])
                elif k[1] == "remote, full views":
                    server_ms[k].append(full.server_ms)
        print(f"\n{'views':>9} {'path':20} {'median ms':>10} {'p90 ms':>8} {'added ms':>9} {'ratio':>6} "
              f"{'server ms':>10} {'overhead ms':>12} {'bytes/request':>14}")
        verdict = []
        for (size, path), t in times.items():
            med, base = statistics.median(t), times[(size, "local")]
            row = f"3x{size:>4}² {path:20} {med:10.2f} {np.percentile(t, 90):8.2f} "
            if path == "local":
                print(row + f"{'':9} {1:6.2f}   (n={len(t)})")
                continue
            # paired per round (the same load for both), and what the server did not spend in the model
            added = statistics.median(np.subtract(t, base))
            srv = server_ms[(size, path)]
            overhead = statistics.median(np.subtract(t, srv))
            print(row + f"{added:+9.2f} {med / statistics.median(base):6.2f} {statistics.median(srv):10.2f} "
                  f"{overhead:12.2f} {requests[(size, path)]:14,d}   (n={len(t)})")
            if size == 224:
                verdict.append(f"{path}: adds {added:+.2f} ms at 224² ({'meets' if added <= GOAL_MS else 'MISSES'} "
                               f"the <= {GOAL_MS:g} ms goal; {overhead:.2f} ms of each round trip outside the model)")
        print("\n" + "\n".join(verdict))
        reply = len(encode_reply(np.zeros((info.chunk_len, info.action_dim)), 1.0, 1.0))
        print(f"bytes per reply: {reply:,d} (a float64 {info.chunk_len} x {info.action_dim} chunk + server_timing)")
        remote.close()
        full.ws.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
