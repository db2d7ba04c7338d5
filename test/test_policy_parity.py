"""ONNX Runtime (CPU) == torch for the tiny bundle, and the CFG arithmetic of the exported graphs."""
import shutil

import numpy as np
import pytest
import torch

from recap_ros.policy import load_policy
from recap_ros.policy.bundle import add_denoise_steps, open_bundle

PROMPT = "touch the red marker with the left gripper"


def views(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def backends():
    return {b: load_policy("tiny", backend=b) for b in ("torch", "onnxruntime")}


@pytest.fixture(scope="module")
def bundle_1step(tmp_path_factory):
    """A copy of the tiny bundle with a 1-step denoise graph, so one Euler step can be checked exactly."""
    d = tmp_path_factory.mktemp("b") / "tiny1"
    shutil.copytree(open_bundle("tiny").dir, d, ignore=shutil.ignore_patterns("engine_cache"))
    return add_denoise_steps(open_bundle(d), [1])


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_onnxruntime_matches_torch(backends, beta):
    q = np.linspace(-0.5, 0.5, 14)
    feeds = backends["torch"].prepare_inputs(views(), q, PROMPT, seed=7, beta=None if beta == 1.0 else beta)
    guided = None if beta == 1.0 else beta
    ref = backends["torch"].backend.run(feeds, 5, guided)
    out = backends["onnxruntime"].backend.run(feeds, 5, guided)
    assert ref.shape == (1, 50, 14) and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)  # normalised actions, fp32
    a = backends["onnxruntime"].infer(views(), q, PROMPT, beta=beta, seed=7)
    b = backends["torch"].infer(views(), q, PROMPT, beta=beta, seed=7)
    assert a.shape == (50, 14) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_seed_reproducible_and_noise_dependent(backends):
    p = backends["onnxruntime"]
    a = p.infer(views(), np.zeros(14), PROMPT, beta=2.0, seed=3)
    np.testing.assert_array_equal(a, p.infer(views(), np.zeros(14), PROMPT, beta=2.0, seed=3))
    assert np.abs(a - p.infer(views(), np.zeros(14), PROMPT, beta=2.0, seed=4)).max() > 1e-3


def test_cfg_beta_one_equals_conditional_branch(backends):
    """The batched CFG graph at β = 1 reproduces the conditional-only graph (the uncond branch cancels)."""
    ort = backends["onnxruntime"]
    feeds = ort.prepare_inputs(views(1), np.zeros(14), PROMPT, seed=1, beta=1.0)
    np.testing.assert_allclose(ort.backend.run(feeds, 5, 1.0), ort.backend.run(feeds, 5, None), atol=1e-5)


def _velocities(model, feeds):
    """v_c (prefix with "Advantage: positive") and v_u (a prefix encoded WITHOUT the indicator) at t = 1."""
    x = {k: torch.from_numpy(v) for k, v in feeds.items()}
    t = torch.ones(1)
    out = []
    for mask in (x["adv_mask"], torch.zeros_like(x["adv_mask"])):
        with torch.no_grad():
            k, v, m = model.encode_prefix(x["images"], x["tokens"], x["token_mask"], x["adv_tokens"], mask, x["state"])
            out.append(model.velocity(k, v, m, None, x["noise"], t).numpy())
    return out


def test_cfg_step_moves_along_guidance_direction(bundle_1step):
    """One Euler step from t = 1: x0 = noise − v with v = v_u + β (v_c − v_u), through the exported ONNX graph.
    v_u comes from a prefix encoded with no indicator tokens, so this also proves the shared-KV masking."""
    pol = load_policy(bundle_1step.dir, backend="onnxruntime")
    model = bundle_1step.load_model()
    feeds = pol.prepare_inputs(views(2), np.full(14, 0.2), PROMPT, seed=5, beta=2.0)
    v_c, v_u = _velocities(model, feeds)
    assert np.abs(v_c - v_u).max() > 1e-4  # the indicator changes the velocity
    for beta in (1.5, 2.0, 3.0):
        feeds["beta"] = np.array([beta], np.float32)
        out = pol.backend.run(feeds, 1, beta)
        np.testing.assert_allclose(out, feeds["noise"] - (v_u + beta * (v_c - v_u)), atol=1e-4)
    feeds["beta"] = np.array([2.0], np.float32)
    a2 = pol.backend.run(feeds, 1, 2.0)
    feeds["beta"] = np.array([3.0], np.float32)
    a3 = pol.backend.run(feeds, 1, 3.0)
    np.testing.assert_allclose(a3 - a2, -(v_c - v_u), atol=1e-4)  # one more β unit = one more step along v_c − v_u
    np.testing.assert_allclose(pol.backend.run(feeds, 1, None), feeds["noise"] - v_c, atol=1e-4)


def test_prefix_kv_independent_of_indicator(bundle_1step):
    model = bundle_1step.load_model()
    pol = load_policy(bundle_1step.dir, backend="torch")
    x = {k: torch.from_numpy(v) for k, v in pol.prepare_inputs(views(), np.zeros(14), PROMPT, 0, None).items()}
    n_adv = model.config.max_advantage_tokens
    with torch.no_grad():
        kc, vc, _ = model.encode_prefix(x["images"], x["tokens"], x["token_mask"], x["adv_tokens"], x["adv_mask"],
                                        x["state"])
        ku, vu, _ = model.encode_prefix(x["images"], x["tokens"], x["token_mask"], x["adv_tokens"],
                                        torch.zeros_like(x["adv_mask"]), x["state"])
    torch.testing.assert_close(kc[..., :-n_adv, :], ku[..., :-n_adv, :])
    torch.testing.assert_close(vc[..., :-n_adv, :], vu[..., :-n_adv, :])
