"""π0.5's state-in-the-prompt format (state_input "tokens"): bins and text as LeRobot's / openpi's pi05 builds them."""
import numpy as np

from recap_ros.policy.tokenizer import ByteTokenizer, PromptEncoder, discretize_state, prompt_text


def test_state_bins_by_hand():
    # 256 bins of width 2/256 starting at -1: -1 -> 0, 0 -> 128, the top bin holds [0.9921875, inf), below -1 -> -1
    assert discretize_state([-1.0, 0.0, 0.999, 1.0, -1.5, -0.9921875]).tolist() == [0, 128, 255, 255, -1, 1]


def test_prompt_text_with_and_without_state():
    assert prompt_text(" pick_up\n", [0.0, -1.0]) == "Task: pick up, State: 128 0;\nAction: "
    assert prompt_text(" pick up ") == "Task: pick up\n"


def test_encoder_tokenises_the_state_per_sample():
    enc = PromptEncoder(ByteTokenizer(), 64, 24)
    out = enc.encode(["go", "go"], [True, None], np.array([[0.0], [1.0]]))
    tok = ByteTokenizer()
    for i, text in enumerate(("Task: go, State: 128;\nAction: ", "Task: go, State: 255;\nAction: ")):
        ids = [tok.bos_id] + tok.encode(text)
        assert out["tokens"][i, :len(ids)].tolist() == ids and out["token_mask"][i].sum() == len(ids)


def test_runtime_puts_the_normalised_state_into_the_prompt(tmp_path):
    from recap_ros.policy.bundle import random_bundle
    from recap_ros.policy.runtime import load_policy

    b = random_bundle("tiny", tmp_path / "b", state_input="tokens", max_text_tokens=128, chunk_len=4)
    policy = load_policy(b.dir, backend="onnxruntime")
    views = [np.zeros((64, 64, 3), np.uint8)] * b.config.num_cameras
    st = b.norm_stats["state"]
    lo, hi = st.q01, st.q99  # quantile normalisation: q01 -> -1, q99 -> 1
    feeds = [policy.prepare_inputs(views, s, "go", 0, None) for s in (lo, hi)]
    for f, bins in zip(feeds, ([0] * 14, [255] * 14)):
        text = "Task: go, State: " + " ".join(map(str, bins)) + ";\nAction: "
        ids = [1] + [c + 3 for c in text.encode()]  # the byte tokenizer by hand: BOS 1, byte + 3
        assert f["tokens"][0, :len(ids)].tolist() == ids
    assert policy.infer(views, hi, "go").shape == (4, 14)
