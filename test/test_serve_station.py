"""The sim station with ``policy.backend: remote`` against recap-serve on the same machine: chunks come from the
server; the server is killed mid-run -> policy_server holds and says why on /diagnostics, no chunk is accepted;
the server comes back on the same port -> chunks resume without restarting anything."""
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import MessageLog, wait_for
from test_serve import Served, free_port

from recap_ros import paths
from recap_ros.station import load_station

pytestmark = [pytest.mark.ros, pytest.mark.slow, pytest.mark.timeout(300)]


def _policy_status(msg):
    return next((s for s in msg.status if s.name == "policy_server"), None)


def test_sim_station_on_a_remote_policy_holds_when_the_server_dies_and_recovers(rclpy_context, spin, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node

    port = free_port()
    data = yaml.safe_load(paths.station_file("sim").read_text())
    data["policy"].update(backend="remote", server=f"ws://127.0.0.1:{port}")
    data["recorder"]["output_dir"] = str(tmp_path / "bags")
    data["sim"]["corrector"] = False  # the policy stays in control while it holds
    station_file = tmp_path / "sim_remote.yaml"
    station_file.write_text(yaml.safe_dump(data))
    st = load_station(str(station_file))

    server = Served("sim_policy", port=port)
    log_path = tmp_path / "station.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "recap_ros.runner", str(station_file)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    msgs = MessageLog()
    node = Node("remote_probe")
    node.create_subscription(DiagnosticArray, st.policy.stats_topic, msgs.callback("chunks"), 10)
    node.create_subscription(DiagnosticArray, "/diagnostics", msgs.callback("diag"), 10)
    spin(node)

    def chunks_since(t):
        return len(msgs.since("chunks", t))

    def station_log():
        return log_path.read_text()[-3000:]

    try:
        wait_for(lambda: chunks_since(0) >= 3 or proc.poll() is not None, 150, "chunks from the remote policy")
        assert proc.poll() is None, station_log()
        assert "client" in server.log() and "connected" in server.log()
        for _, m in msgs.since("chunks", 0):  # each chunk starts past its whole round trip (20 ms ticks)
            v = {kv.key: kv.value for kv in m.status[0].values}
            assert int(v["delay_ticks"]) * 20.0 >= float(v["latency_ms"]) - 20.0, v
        server.kill()
        t_kill = time.monotonic()

        def says_remote_hold():
            for _, m in msgs.since("diag", t_kill):
                s = _policy_status(m)
                if s is not None and s.level in (1, b"\x01") and "remote policy server" in s.message:
                    return True
            return False
        wait_for(says_remote_hold, 15, "policy_server to hold and name the remote server on /diagnostics")
        print(f"{chunks_since(0)} chunks before the kill; hold reported {time.monotonic() - t_kill:.2f} s after it")
        time.sleep(2.0)
        assert chunks_since(t_kill + 0.5) == 0  # nothing accepted while the server is down
        assert proc.poll() is None, station_log()

        server = Served("sim_policy", port=port)
        t_back = time.monotonic()
        wait_for(lambda: chunks_since(t_back) >= 1, 60, "a chunk after the server came back")
        print(f"first chunk {msgs.since('chunks', t_back)[0][0] - t_back:.2f} s after the server listened again")
        wait_for(lambda: chunks_since(t_back) >= 3, 30, "chunks after the server came back")

        def executing():
            for _, m in msgs.since("diag", t_back):
                s = _policy_status(m)
                if s is not None and s.level in (0, b"\x00") and s.message == "executing":
                    return True
            return False
        wait_for(executing, 15, "policy_server executing again")
    finally:
        server.stop()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        log.close()
    assert rc == 0, station_log()
