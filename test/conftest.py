"""Test isolation: every test session gets its own ROS domain and localhost-only discovery, so parallel
sessions (and a station running on the same machine) never see each other's traffic. Shared fixtures: rclpy,
a background executor, a private copy of the ``tiny`` policy bundle."""
import os
import shutil
import threading

import pytest

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# MuJoCo picks its GL backend when first imported (any test module may import it first): headless EGL, as
# recap_ros.sim.aloha sets it for the aloha_sim node
os.environ.setdefault("MUJOCO_GL", "egl")
# ONNX export in tests: the TorchScript exporter (the dynamo default takes 4-6x longer; test_export_dynamo covers it)
os.environ.setdefault("RECAP_ONNX_EXPORTER", "torchscript")
if "ROS_DOMAIN_ID" not in os.environ:
    os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)


@pytest.fixture(scope="session")
def rclpy_context():
    """rclpy initialised once for the session (skips where no rclpy is importable)."""
    rclpy = pytest.importorskip("rclpy")
    rclpy.init()
    yield rclpy
    rclpy.shutdown()


@pytest.fixture
def spin(rclpy_context):
    """spin(node, ...) -> spins the nodes on a background executor for the rest of the test."""
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor()  # rclpy's MultiThreadedExecutor is slow enough to fall behind 50 Hz streams
    thread = None

    def _spin(*nodes):
        nonlocal thread
        for n in nodes:
            executor.add_node(n)
        if thread is None:
            thread = threading.Thread(target=executor.spin, daemon=True)
            thread.start()
        return executor

    yield _spin
    nodes = list(executor.get_nodes())
    executor.shutdown(timeout_sec=2)  # stop spinning before the nodes go away
    if thread is not None:
        thread.join(timeout=2)
    for n in nodes:
        n.destroy_node()


@pytest.fixture
def tiny_copy(tmp_path):
    """A private copy of the ``tiny`` policy bundle (without its engine cache) that a test may modify."""
    from recap_ros.policy.bundle import open_bundle

    d = tmp_path / "tiny"
    shutil.copytree(open_bundle("tiny").dir, d, ignore=shutil.ignore_patterns("engine_cache"))
    return d
