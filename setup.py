"""ament_python package recap_ros. `colcon build` on a ROS 2 machine, or `pip install -e .[standalone]`
on a machine without ROS (the `standalone` extra brings the ROS 2 Kilted wheels from PyPI)."""
from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = "recap_ros"

NODES = ["sim_robot", "aloha_sim", "scripted_corrector", "camera_ingest", "policy_server", "cfg_guidance",
         "teleop_mux", "episode_recorder", "value_monitor"]
CLIS = {
    "recap-station": "recap_ros.runner:main",
    "recap-build-engine": "recap_ros.policy.cli:build_engine_main",
    "recap-bag-repair": "recap_ros.recording.repair:main",
    "recap-export": "recap_ros.export.cli:main",
    "recap-report": "recap_ros.report.cli:main",
    "recap-train-value": "recap_ros.recap.cli:train_value_main",
    "recap-label": "recap_ros.recap.cli:label_main",
    "recap-train-policy": "recap_ros.recap.cli:train_policy_main",
    "recap-sim-demos": "recap_ros.sim.cli:demos_main",
    "recap-serve": "recap_ros.serve.cli:main",
    "recap-import-checkpoint": "recap_ros.policy.import_checkpoint:main",
}


def tree(src):
    """data_files entries that install every file below src under share/recap_ros/src."""
    out = {}
    for path in glob(os.path.join(src, "**", "*"), recursive=True):
        if (os.path.isfile(path) and "__pycache__" not in path and "engine_cache" not in path
                and ".run/" not in path):  # a training run's checkpoints and metrics (recap-train-* OUT.run)
            out.setdefault(os.path.join("share", PACKAGE, os.path.dirname(path)), []).append(path)
    return sorted(out.items())


ROS_WHEELS = ["ros-rclpy", "ros-rmw-fastrtps-cpp", "ros-std-msgs", "ros-sensor-msgs", "ros-trajectory-msgs",
              "ros-std-srvs", "ros-diagnostic-msgs", "ros-geometry-msgs", "ros-builtin-interfaces",
              "ros-wheels-bootstrapper"]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "bench"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        ("share/" + PACKAGE + "/launch", glob("launch/*.launch.py")),
        *tree("config"),
        *tree("models"),
    ],
    python_requires=">=3.10",
    install_requires=[
        "setuptools",
        "numpy>=1.26",
        "pyyaml>=6",
        "opencv-python-headless>=4.9",
        "rosbags>=0.10",
        "mcap>=1.2",
        "zstandard>=0.21",
        "torch==2.13.0",
        "onnx>=1.16",
        "onnxruntime>=1.24",      # opset-23 Attention on CPU with grouped-query heads (ort_graph.fuse_attention)
        "onnxscript>=0.5",        # torch.onnx.export(dynamo=True)
        "onnx-ir>=0.1.10",        # graph passes on exported graphs (onnxscript brings it)
        "safetensors>=0.4",
        "tqdm>=4.66",
        "tensorboard>=2.16",      # recap-train-*: metrics as TensorBoard event files (SummaryWriter needs it)
        "matplotlib>=3.8",
        "pyarrow>=15",
        "av>=12",                 # PyAV: H.264 video of the LeRobot export
        "transforms3d>=0.4",      # sim kinematics
        "sentencepiece>=0.2",     # tokenizer.model of real checkpoints
        "ruamel.yaml>=0.17",      # rosbag2 metadata.yaml, written as rosbags does
        "websockets>=17",         # recap-serve / remote backend: openpi's websocket policy protocol
        "msgpack>=1.0",           # its msgpack-numpy frames
    ],
    extras_require={
        # A machine without a ROS 2 install: the Kilted wheels from PyPI. A ROS machine keeps its own rclpy.
        "standalone": ROS_WHEELS,
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-rerunfailures>=14",
                 "transformers>=5,<6"],  # reference implementation of the Gemma 3 / SigLIP parity tests
        # NVIDIA GPU serving: TensorRT (strongly typed engines; 10.12+ or 11.x) and ONNX Runtime with the CUDA and
        # TensorRT execution providers (1.27+ supports TensorRT 11). onnxruntime-gpu installs the same `onnxruntime`
        # module as the CPU wheel: uninstall onnxruntime first (bench/gpu_check.sh does).
        "gpu": ["tensorrt>=10.12", "onnxruntime-gpu>=1.27"],
        # The MuJoCo ALOHA station (aloha_sim): gym-aloha's scenes and tasks (its internals are used: pinned).
        # Headless rendering needs EGL from the system (README, "MuJoCo ALOHA station").
        "aloha": ["gym-aloha==0.1.5", "mujoco>=3.2,<3.9", "dm-control>=1.0.15,<1.1"],
    },
    zip_safe=False,
    maintainer="recap_ros developers",
    maintainer_email="recap-ros@example.com",
    description="ROS 2 stack for a pi0.6*-style VLA trained with RECAP",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [f"{n} = recap_ros.nodes.{n}:main" for n in NODES]
        + [f"{k} = {v}" for k, v in CLIS.items()],
    },
)
