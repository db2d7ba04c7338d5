"""recap-serve and the remote backend (ROS-free), checked against independent ends of the protocol:

* the real ``openpi-client`` from PyPI (``WebsocketClientPolicy``), in its own cached venv (it pins numpy < 2),
  gets chunks from recap-serve; they equal the local runtime's chunk for the same inputs;
* hand-made msgpack frames (built with msgpack alone) for every kind of bad request: one error text frame
  each, the connection stays usable, the server keeps running; no or a wrong API key is refused;
* RemotePolicy against recap-serve (equal to local, wss, kill -> errors -> recovery after the server is back)
  and against a hand-made fake server whose chunks the chunk executor must reject or limit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers import REPO, wait_for
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve

from recap_ros.control.stitching import ChunkExecutor, ChunkRejected, JointLimits
from recap_ros.policy import PolicyError, load_policy
from recap_ros.serve.client import RemotePolicy
from recap_ros.station import load_station

pytestmark = pytest.mark.timeout(300)

KEY_ENV, KEY = "RECAP_TEST_SERVE_KEY", "s3cret-key-for-tests"
PROMPT = "touch the red marker with the left gripper"
CAMS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
OPENPI_CLIENT = "openpi-client==0.1.2"  # its websocket_client_policy imports typing_extensions, not declared
OPENPI_PACKAGES = (OPENPI_CLIENT, "typing_extensions")
OPENPI_VENV = REPO / ".cache" / "openpi-client-venv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``python -m recap_ros.serve.cli`` as a process; ``url`` once it listens, its log lines in ``lines``."""

    def __init__(self, *args: str, port: int = 0, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "recap_ros.serve.cli", *args, "--port", str(port)],
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
                                     env={**os.environ, KEY_ENV: KEY, **(env or {})})
        self.lines: list[str] = []
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: self.url is not None or self.proc.poll() is not None, 120, "recap-serve to listen")
        assert self.url, "recap-serve exited:\n" + "".join(self.lines)
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"serving \S+ on (wss?://\S+)", line)
            if m:
                self.url = m.group(1)

    def log(self) -> str:
        return "".join(self.lines)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@pytest.fixture(scope="module")
def served():
    s = Served("sim_policy", "--backend", "onnxruntime", "--api-key-env", KEY_ENV, "--max-request-mb", "1")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def local():
    return load_policy("sim_policy", backend="onnxruntime")


# ------------------------------------------------------------------------------------------ hand-made frames
def nd(arr: np.ndarray) -> dict:
    """openpi's msgpack-numpy array map, written out by hand."""
    return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}


def observation(**over) -> dict:
    rng = np.random.default_rng(1)
    obs = {"state": nd(np.full(14, 0.1)), "prompt": PROMPT,
           "images": {k: nd(rng.integers(0, 256, (3, 48, 48), dtype=np.uint8)) for k in CAMS}}
    obs.update(over)
    return {k: v for k, v in obs.items() if v is not None}


def frame(**over) -> bytes:
    return msgpack.packb(observation(**over))


def open_ws(url, key=KEY):
    ws = connect(url, additional_headers={"Authorization": f"Api-Key {key}"}, max_size=None, compression=None,
                 legacy=True)
    meta = msgpack.unpackb(ws.recv(timeout=10))
    return ws, meta


def reply_actions(reply) -> np.ndarray:
    assert isinstance(reply, bytes), reply
    msg = msgpack.unpackb(reply)
    a = msg["actions"]
    assert msg["server_timing"]["infer_ms"] > 0
    return np.frombuffer(a[b"data"], dtype=np.dtype(a[b"dtype"])).reshape(a[b"shape"])


def test_bad_requests_get_one_error_frame_each_and_the_connection_stays_usable(served):
    ws, meta = open_ws(served.url)
    assert meta["recap_ros"]["images"] == list(CAMS)
    assert meta["recap_ros"]["policy"]["chunk_len"] == 50 and meta["recap_ros"]["policy"]["action_dim"] == 14
    ws.send(frame())
    good = reply_actions(ws.recv(timeout=30))
    assert good.shape == (50, 14) and np.isfinite(good).all()
    img = np.zeros((3, 48, 48), np.uint8)
    bad = {
        "not msgpack": b"\xc1\xff\x00garbage",
        "truncated": frame()[:-10],
        "not a map": msgpack.packb([1, 2, 3]),
        "text frame": "hello",
        "oversized": frame(prompt="x" * (2**20 + 10)),
        "NaN state": frame(state=nd(np.array([np.nan] + [0.1] * 13))),
        "state shape": frame(state=nd(np.zeros(13))),
        "state as text": frame(state="0.1"),
        "HWC image": frame(images={**{k: nd(img) for k in CAMS}, "cam_high": nd(np.zeros((48, 48, 3), np.uint8))}),
        "float image": frame(images={k: nd(img.astype(np.float32)) for k in CAMS}),
        "missing camera": frame(images={k: nd(img) for k in CAMS[:2]}),
        "empty image": frame(images={k: nd(np.zeros((3, 0, 48), np.uint8)) for k in CAMS}),
        "no prompt": frame(prompt=None),
        "unknown key": frame(actions=nd(np.zeros(3))),
        "object dtype": frame(state={b"__ndarray__": True, b"data": b"\0" * 112, b"dtype": "|O", b"shape": [14]}),
        "short data": frame(state={b"__ndarray__": True, b"data": b"\0" * 100, b"dtype": "<f8", b"shape": [14]}),
        "negative shape": frame(state={b"__ndarray__": True, b"data": b"", b"dtype": "<f8", b"shape": [-1]}),
        "bad beta": frame(beta=-1.0),
        "bad steps": frame(denoise_steps=0),
        "bad seed": frame(seed="seven"),
        "bad advantage": frame(advantage="yes"),
        "guided without indicator": frame(advantage=False, beta=2.0),
    }
    for name, data in bad.items():
        ws.send(data)
        reply = ws.recv(timeout=30)
        assert isinstance(reply, str) and reply, (name, reply)
        print(f"{name}: {reply[:120]}")
        ws.send(frame())  # the same connection still serves, and the reply is the same chunk
        np.testing.assert_array_equal(reply_actions(ws.recv(timeout=30)), good, err_msg=name)
    # the extras reach the model: another seed, no indicator, CFG each change the chunk
    for extra in ({"seed": 5}, {"advantage": False}, {"beta": 2.0}, {"denoise_steps": 5, "seed": 0}):
        ws.send(frame(**extra))
        a = reply_actions(ws.recv(timeout=30))
        assert (a == good).all() == (extra == {"denoise_steps": 5, "seed": 0}), extra
    ws.close()
    assert served.proc.poll() is None


def test_a_frame_beyond_the_hard_limit_closes_only_its_connection(served):
    from websockets.exceptions import ConnectionClosedError

    other, _ = open_ws(served.url)
    ws, _ = open_ws(served.url)
    ws.send(frame(prompt="x" * (4 * 2**20 + 10)))  # 4 x the 1 MiB request limit: not read
    with pytest.raises(ConnectionClosedError) as e:
        ws.recv(timeout=30)
    assert e.value.rcvd.code == 1009
    other.send(frame())
    assert reply_actions(other.recv(timeout=30)).shape == (50, 14)
    other.close()
    assert served.proc.poll() is None


def test_without_the_api_key_no_connection(served):
    for headers in (None, {"Authorization": "Api-Key wrong"}, {"Authorization": f"Bearer {KEY}"}):
        with pytest.raises(InvalidStatus) as e:
            connect(served.url, additional_headers=headers, open_timeout=10, legacy=True)
        assert e.value.response.status_code == 401
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz", timeout=10) as r:
        assert r.read() == b"OK\n"


def test_clients_connected_at_once_are_all_served(served):
    conns = [open_ws(served.url)[0] for _ in range(3)]
    for seed, ws in enumerate(conns):
        ws.send(frame(seed=seed))
    chunks = [reply_actions(ws.recv(timeout=60)) for ws in conns]
    assert not np.array_equal(chunks[0], chunks[1]) and not np.array_equal(chunks[1], chunks[2])
    for ws in conns:
        ws.close()


# ------------------------------------------------------------------------------------------ openpi-client
def openpi_python() -> Path:
    """Python of a venv (cached under .cache/) with openpi-client from PyPI; it pins numpy < 2."""
    py = OPENPI_VENV / "bin" / "python"
    marker = OPENPI_VENV / ".installed"
    if not (py.exists() and marker.exists() and marker.read_text() == " ".join(OPENPI_PACKAGES)):
        shutil.rmtree(OPENPI_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(OPENPI_VENV)], check=True, timeout=300)
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *OPENPI_PACKAGES],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"pip install {OPENPI_CLIENT} failed:\n{r.stdout}\n{r.stderr}"
        marker.write_text(" ".join(OPENPI_PACKAGES))
    return py


OPENPI_SCRIPT = r'''
import json, sys
import numpy as np
from openpi_client import websocket_client_policy as wcp

host, port, key, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
client = wcp.WebsocketClientPolicy(host, port, api_key=key)
rng = np.random.default_rng(0)
obs = {"state": np.linspace(-0.3, 0.6, 14), "prompt": "touch the red marker with the left gripper", "seed": 7,
       "images": {k: rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)
                  for k in ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")}}
first = client.infer(obs)
try:
    client.infer(dict(obs, state=np.full(14, np.nan)))
    error = None
except RuntimeError as e:
    error = str(e)
second = client.infer(dict(obs, beta=2.0, denoise_steps=5))
try:
    wcp.WebsocketClientPolicy(host, port, api_key="not-the-key")
    refused = None
except Exception as e:
    refused = f"{type(e).__name__}: {e}"
np.savez(out, state=obs["state"], first=first["actions"], second=second["actions"],
         **{k: v for k, v in obs["images"].items()})
print(json.dumps({"numpy": np.__version__, "metadata": client.get_server_metadata(), "error": error,
                  "refused": refused, "timing": first["server_timing"], "dtype": str(first["actions"].dtype)}))
'''


def test_openpi_client_from_pypi_gets_chunks_from_recap_serve(served, local, tmp_path):
    py = openpi_python()
    script, out = tmp_path / "client.py", tmp_path / "out.npz"
    script.write_text(OPENPI_SCRIPT)
    r = subprocess.run([py, script, "127.0.0.1", str(served.port), KEY, out], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(res)
    assert res["numpy"].startswith("1.")  # openpi-client's own numpy, not the project's
    assert res["metadata"]["recap_ros"]["policy"]["name"] == "sim_policy"
    assert "Error in inference server" in res["error"] and "non-finite" in res["error"]
    assert "401" in res["refused"]
    assert res["timing"]["infer_ms"] > 0 and res["dtype"] == "float64"
    d = np.load(out)
    views = [d[k].transpose(1, 2, 0) for k in CAMS]  # the model's cameras; cam_low was ignored
    expect = local.infer(views, d["state"], PROMPT, seed=7)
    np.testing.assert_allclose(d["first"], expect, rtol=0, atol=1e-9)
    np.testing.assert_allclose(d["second"], local.infer(views, d["state"], PROMPT, beta=2.0, seed=7, steps=5),
                               rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ RemotePolicy
def views(size=224, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in CAMS]


def test_remote_policy_equals_local_and_checks_the_station(served, local):
    with pytest.raises(PolicyError, match="401"):
        RemotePolicy(served.url, "wrong", wait_s=0)
    remote = RemotePolicy(served.url, KEY)
    assert remote.info.bundle_id == local.info.bundle_id and remote.info.chunk_len == 50
    remote.check_station(load_station("sim"))
    q = np.linspace(-0.2, 0.4, 14)
    for beta, size in ((1.0, 224), (2.0, 100)):
        np.testing.assert_allclose(remote.infer(views(size), q, PROMPT, beta=beta, seed=4),
                                   local.infer(views(size), q, PROMPT, beta=beta, seed=4), rtol=0, atol=1e-9)
    with pytest.raises(PolicyError, match="non-finite"):
        remote.infer(views(), np.full(14, np.nan), PROMPT)
    assert remote.infer(views(), q, PROMPT).shape == (50, 14)  # the connection survived the error
    assert remote.server_timing["infer_ms"] > 0
    remote.close()


def test_connect_remote_from_the_station_policy_section(served, monkeypatch):
    from types import SimpleNamespace

    from recap_ros.serve.client import connect_remote

    section = SimpleNamespace(server=served.url, api_key_env="RECAP_TEST_UNSET_KEY")
    monkeypatch.delenv("RECAP_TEST_UNSET_KEY", raising=False)
    with pytest.raises(PolicyError, match="RECAP_TEST_UNSET_KEY is not set"):
        connect_remote(section, "sim_policy")
    monkeypatch.setenv("RECAP_TEST_UNSET_KEY", KEY)
    with pytest.raises(PolicyError, match="policy.bundle is 'tiny' but .* serves 'sim_policy'"):
        connect_remote(section, "tiny")
    connect_remote(section, "sim_policy").close()
    with pytest.raises(PolicyError, match="needs policy.server"):
        connect_remote(SimpleNamespace(server="", api_key_env=""), "sim_policy")


def test_server_killed_then_back_reconnects_with_backoff(tmp_path):
    port = free_port()
    first = Served("sim_policy", port=port)
    remote = RemotePolicy(first.url)
    q = np.full(14, 0.1)
    before = remote.infer(views(), q, PROMPT)
    first.kill()
    with pytest.raises(PolicyError, match="connection lost|cannot connect"):
        remote.infer(views(), q, PROMPT)
    errors = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # the server is down: failed attempts, then fast failures until the next
        try:
            remote.infer(views(), q, PROMPT)
        except PolicyError as e:
            errors.append(str(e))
        time.sleep(0.05)
    assert any("cannot connect" in e for e in errors) and any("next attempt in" in e for e in errors), errors
    attempts = sum("cannot connect" in e for e in errors)
    assert 2 <= attempts <= 4, errors  # 0.5 s, 1 s, 2 s apart: no hammering
    second = Served("sim_policy", port=port)
    try:
        wait_for(lambda: _ok(remote, q), 10, "a chunk after the server came back")
        np.testing.assert_array_equal(remote.infer(views(), q, PROMPT), before)
    finally:
        second.stop()
    other = Served(str(REPO / "models" / "tiny"), port=port)  # back with another model: refused
    try:
        time.sleep(0.2)
        with pytest.raises(PolicyError):
            remote.infer(views(), q, PROMPT)
        wait_for(lambda: _refused_as_other_model(remote, q), 15, "the other model to be refused")
    finally:
        other.stop()


def _ok(remote, q) -> bool:
    try:
        return remote.infer(views(), q, PROMPT).shape == (50, 14)
    except PolicyError:
        return False


def _refused_as_other_model(remote, q) -> bool:
    try:
        remote.infer(views(), q, PROMPT)
    except PolicyError as e:
        return "now serves bundle tiny" in str(e)
    raise AssertionError("a server with another model served this client")


def test_wss_with_a_certificate(tmp_path, local, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key,
                    "-out", cert], check=True, capture_output=True)
    s = Served("sim_policy", "--backend", "onnxruntime", "--certfile", str(cert), "--keyfile", str(key))
    try:
        assert s.url.startswith("wss://")
        with pytest.raises(PolicyError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            RemotePolicy(s.url, wait_s=0)  # a self-signed certificate is not trusted by default
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        remote = RemotePolicy(s.url)
        q = np.full(14, 0.2)
        np.testing.assert_allclose(remote.infer(views(), q, PROMPT), local.infer(views(), q, PROMPT), atol=1e-9)
        remote.close()
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------ untrusted replies
def fake_server(chunk_frames: list):
    """A hand-made protocol server: a hand-written metadata map, then the given reply frames in turn."""
    meta = {"recap_ros": {"protocol": 1, "images": list(CAMS), "image_resize": "resize", "extras": [],
                          "max_request_bytes": 2**20,
                          "policy": {"name": "fake", "bundle_id": "f00", "backend": "fake", "device": "cpu",
                                     "chunk_len": 50, "action_dim": 14, "state_dim": 14,
                                     "camera_roles": ["base", "left_wrist", "right_wrist"], "image_size": 32,
                                     "denoise_steps": 5, "exported_steps": [5], "joint_names": None,
                                     "normalization": "quantile", "action_space": "absolute_joint_positions"}}}
    replies = iter(chunk_frames)

    def handler(ws):
        ws.send(msgpack.packb(meta))
        for msg in ws:
            obs = msgpack.unpackb(msg)
            assert obs["images"]["cam_high"][b"shape"] == [3, 32, 32]  # fitted to the model's size before sending
            ws.send(next(replies))

    server = serve(handler, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"ws://127.0.0.1:{server.socket.getsockname()[1]}"


def test_actions_from_the_server_are_validated_like_local_ones():
    station = load_station("sim")
    limits = JointLimits.from_robot(station.robot)
    q = np.full(14, 0.1)
    nan = np.tile(q, (50, 1))
    nan[7, 3] = np.nan
    far = np.tile(q, (50, 1))
    far[:, 0] = 100.0  # beyond the joint limit and the velocity limit
    replies = [msgpack.packb({"actions": nd(x)}) for x in (nan, np.zeros((49, 14)), np.zeros((50, 13)), far)]
    replies += [msgpack.packb({"no actions": 1}), "PolicyError: the server says no"]
    server, url = fake_server(replies)
    try:
        remote = RemotePolicy(url)
        remote.check_station(station)
        for expect in ("non-finite", r"shape \(49, 14\)", r"shape \(50, 13\)"):
            ex = ChunkExecutor(limits, 50, 25, 5)
            ex.reset(q)
            req = ex.request()
            with pytest.raises(ChunkRejected, match=expect):
                ex.accept(req, remote.infer(views(), q, PROMPT))
        ex = ChunkExecutor(limits, 50, 25, 5)
        ex.reset(q)
        ex.accept(ex.request(), remote.infer(views(), q, PROMPT))
        cmds = np.array([ex.step().command for _ in range(60)])
        assert cmds[:, 0].max() <= limits.upper[0] and np.all(np.abs(np.diff(cmds[:, 0])) <= limits.max_step[0]
                                                              + 1e-12)
        with pytest.raises(PolicyError, match="no actions array"):
            remote.infer(views(), q, PROMPT)
        with pytest.raises(PolicyError, match="server error: PolicyError: the server says no"):
            remote.infer(views(), q, PROMPT)
    finally:
        server.shutdown()


def test_station_remote_keys():
    import yaml

    from recap_ros import paths
    from recap_ros.station import StationConfigError, parse_station

    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["policy"].update(backend="remote", server="wss://gpu-box:8000", api_key_env="RECAP_KEY")
    pol = parse_station(data).policy
    assert (pol.backend, pol.server, pol.api_key_env) == ("remote", "wss://gpu-box:8000", "RECAP_KEY")
    for key, value, why in (("server", "http://gpu-box:8000", "ws://host:port"),
                            ("api_key_env", "RECAP KEY", "environment variable")):
        bad = yaml.safe_load(yaml.safe_dump(data))
        bad["policy"][key] = value
        with pytest.raises(StationConfigError, match=why):
            parse_station(bad)
    local_data = yaml.safe_load(paths.station_file("sim").read_text())
    local_data["policy"]["server"] = "ws://gpu-box:8000"
    with pytest.raises(StationConfigError, match="only used with backend: remote"):
        parse_station(local_data)
