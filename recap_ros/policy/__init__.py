"""π0.6*-style policy: model, tokenizer, normalisation, bundles, ONNX export and inference backends (ROS-free).

Runtime (action server)::

    from recap_ros.policy import load_policy, PolicyError
    policy = load_policy("tiny", backend="auto")      # auto | torch | onnxruntime | tensorrt
    chunk = policy.infer(images=[base, left, right], state=q, prompt="...", beta=1.0, seed=0)  # (50, 14) float64

Training (RECAP trainer): see :mod:`recap_ros.policy.training` (model presets, flow-matching loss with the
advantage indicator, norm stats, ``save_bundle``).
"""
from recap_ros.policy.errors import PolicyError
from recap_ros.policy.runtime import Policy, PolicyInfo, load_policy

__all__ = ["PolicyError", "Policy", "PolicyInfo", "load_policy"]
