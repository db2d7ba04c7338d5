"""Architecture parity with transformers (the reference implementation) at small random configurations.

Each test builds a random model with transformers' own classes, saves it with ``save_pretrained``, imports the
folder with recap-import-checkpoint's tensor map (fp32) and compares fp32 outputs: SigLIP + projector (Gemma 3's and
PaliGemma's), the Gemma 3 decoder (causal, 5:1-style local/global layers with a sliding window, two RoPE bases,
linear RoPE scaling, QK-norm, sandwich norms), the decoder with the prefix KV cache used the way this stack uses
it (prefix once, then suffix tokens attending to the cached prefix), and the whole prefix path (images + prompt
through ``Gemma3Model``). Expected values come from transformers' forward passes only.
"""
import pytest
import torch

import transformers  # the test extra installs it: a missing install fails here, it never skips
import hf_models
from hf_models import WINDOW

from recap_ros.policy.import_checkpoint import plan_import, write_weights
from recap_ros.policy.model import Pi06Policy, images_to_float

TOL = 1e-4
OURS = {"expert_width": 32, "expert_mlp_dim": 48, "camera_roles": ["base"], "state_input": "tokens",
        "max_text_tokens": 10, "max_advantage_tokens": 20, "chunk_len": 4, "state_dim": 3, "action_dim": 3}


def _import(hf_model, tmp_path, **overrides):
    """Save the HF model, import it (fp32) and return our model with its weights."""
    hf_model.save_pretrained(tmp_path / "hf")
    plan = plan_import(tmp_path / "hf", "hf", {**OURS, **overrides})
    write_weights(plan, tmp_path / "w.safetensors", torch.float32)
    from safetensors.torch import load_file

    ours = Pi06Policy(plan.config)
    ours.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    return ours.eval()


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    hf = hf_models.gemma3()
    return hf, _import(hf, tmp_path_factory.mktemp("g3"), image_size=28)


def test_gemma3_import_takes_over_the_config(gemma3):
    c = gemma3[1].config
    assert (c.qk_norm, c.sandwich_norm, c.global_every, c.sliding_window) == (True, True, 2, WINDOW)
    assert (c.rope_theta, c.rope_local_theta, c.rope_scale) == (1e6, 1e4, 8.0)
    assert (c.vision_projector, c.vision_tokens, c.vocab_size, c.width, c.heads, c.kv_heads) == (
        "gemma3", 4, 300, 64, 4, 2)


def test_gemma3_vision_tower_and_projector(gemma3):
    hf, ours = gemma3
    img = torch.rand(2, 28, 28, 3)
    pixels = img.permute(0, 3, 1, 2) * 2 - 1  # SigLIP's processor: (x - 0.5) / 0.5
    with torch.no_grad():
        want = hf.model.get_image_features(pixels).pooler_output
        got = ours.prefix.vision(images_to_float(img[:, None])[:, 0])
    assert want.shape == got.shape == (2, 4, 64)
    assert (want - got).abs().max() < TOL


def _causal(s):
    return torch.tril(torch.ones(s, s, dtype=torch.bool))[None]


def test_gemma3_decoder_causal_with_local_and_global_layers(gemma3):
    hf, ours = gemma3
    s = 16  # > WINDOW: the local layers' window cuts keys off
    x = torch.randn(1, s, 64)
    pos = torch.arange(s, dtype=torch.float32)[None]
    with torch.no_grad():
        want = hf.model.language_model(inputs_embeds=x).last_hidden_state
        t = ours.prefix.types
        h, _, _ = t.run(ours.prefix.layers, x, t.contexts(_causal(s), pos, pos))
        got = ours.prefix.norm(h)
    assert (want - got).abs().max() < TOL


def _hf_masks(allowed, q_pos, k_pos):
    """HF's mask mapping (additive, per layer type) from an allowed matrix (B, Q, K), by hand: local layers also
    need |q - k| < window."""
    near = (q_pos[:, :, None] - k_pos[:, None, :]).abs() < WINDOW
    to_add = lambda a: torch.where(a, 0.0, torch.finfo(torch.float32).min)[:, None]  # noqa: E731
    return {"full_attention": to_add(allowed), "sliding_attention": to_add(allowed & near)}


def test_gemma3_decoder_prefix_cache_then_suffix(gemma3):
    """Prefix (bidirectional) once, then suffix tokens that see the cached prefix and each other (bidirectional)."""
    hf, ours = gemma3
    p, s = 12, 5
    xp, xs = torch.randn(1, p, 64), torch.randn(1, s, 64)
    pp = torch.arange(p, dtype=torch.float32)[None]
    ps = torch.arange(p, p + s, dtype=torch.float32)[None]
    lm = hf.model.language_model
    with torch.no_grad():
        cache = transformers.DynamicCache()  # full keys in every layer (a config would make local layers drop old ones)
        lm(inputs_embeds=xp, attention_mask=_hf_masks(torch.ones(1, p, p, dtype=torch.bool), pp, pp),
           position_ids=pp.long(), cache=cache, use_cache=True)
        allowed = torch.ones(1, s, p + s, dtype=torch.bool)
        want = lm(inputs_embeds=xs, attention_mask=_hf_masks(allowed, ps, torch.cat([pp, ps], 1)),
                  position_ids=ps.long(), cache=cache, use_cache=True).last_hidden_state
        t = ours.prefix.types
        _, keys, values = t.run(ours.prefix.layers, xp, t.contexts(torch.ones(1, p, p, dtype=torch.bool), pp, pp))
        h, _, _ = t.run(ours.prefix.layers, xs, t.contexts(allowed, ps, torch.cat([pp, ps], 1)),
                        past=(torch.stack(keys), torch.stack(values)))
        got = ours.prefix.norm(h)
    assert (want - got).abs().max() < TOL


def test_gemma3_whole_prefix_path(gemma3):
    """Image + prompt + advantage segment through our PrefixEncoder vs transformers' Gemma3Model (same tokens, the
    prefix-LM mask: the prefix never sees the advantage segment, which sees everything)."""
    hf, ours = gemma3
    c = ours.config
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (1, 1, 28, 28, 3), dtype=torch.uint8, generator=g)
    tokens = torch.randint(3, 259, (1, c.max_text_tokens), generator=g)
    adv = torch.randint(3, 259, (1, c.max_advantage_tokens), generator=g)
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    with torch.no_grad():
        _, _, kv_mask, got = ours.prefix(images_to_float(img), tokens, ones(tokens), adv, ones(adv))
        n_img = c.vision_tokens
        ids = torch.cat([torch.full((1, n_img), hf_models.IMAGE_TOKEN), tokens, adv], 1)
        seq = ids.shape[1]
        prefix = torch.arange(seq) < seq - c.max_advantage_tokens
        allowed = prefix[None, :] | ~prefix[:, None]  # key in the prefix, or the query in the advantage segment
        pos = torch.arange(seq, dtype=torch.float32)[None]
        pixels = img[:, 0].permute(0, 3, 1, 2).float() / 255 * 2 - 1
        want = hf.model(input_ids=ids, pixel_values=pixels, attention_mask=_hf_masks(allowed[None], pos, pos),
                        position_ids=pos.long()).last_hidden_state
    assert want.shape == got.shape
    assert (want - got).abs().max() < TOL


def test_paligemma_vision_and_gemma_decoder(tmp_path):
    """π0.5's backbone: PaliGemma's SigLIP + linear projector (every patch a token) and the Gemma 1 decoder."""
    hf = hf_models.paligemma()
    ours = _import(hf, tmp_path, heads=4, kv_heads=1, head_dim=16)
    assert (ours.config.vision_tokens, ours.config.image_size, ours.config.qk_norm) == (16, 28, False)
    img = torch.rand(1, 28, 28, 3)
    x = torch.randn(1, 9, 64)
    pos = torch.arange(9, dtype=torch.float32)[None]
    with torch.no_grad():
        want_img = hf.model.get_image_features(img.permute(0, 3, 1, 2) * 2 - 1).pooler_output
        got_img = ours.prefix.vision(images_to_float(img[:, None])[:, 0])
        want = hf.model.language_model(inputs_embeds=x).last_hidden_state
        t = ours.prefix.types
        got = ours.prefix.norm(t.run(ours.prefix.layers, x, t.contexts(_causal(9), pos, pos))[0])
    assert (want_img - got_img).abs().max() < TOL
    assert (want - got).abs().max() < TOL


def test_pi06_preset_is_gemma3_4b_and_so400m_at_448():
    """Numbers from google/gemma-3-4b's config.json (text_config; the rest are Gemma3TextConfig's defaults)."""
    from recap_ros.policy.config import preset

    c = preset("pi06")
    want = transformers.Gemma3TextConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                                         num_hidden_layers=34, sliding_window=1024,
                                         rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert (c.vocab_size, c.width, c.mlp_dim, c.depth, c.heads, c.kv_heads, c.head_dim) == (
        want.vocab_size, want.hidden_size, want.intermediate_size, want.num_hidden_layers, want.num_attention_heads,
        want.num_key_value_heads, want.head_dim)
    assert c.head_dim == want.query_pre_attn_scalar and c.sliding_window == want.sliding_window
    assert [c.layer_is_local(i) for i in range(c.depth)] == [t == "sliding_attention" for t in want.layer_types]
    rp = want.rope_parameters
    assert (c.rope_theta, c.rope_scale, c.rope_local_theta) == (
        rp["full_attention"]["rope_theta"], rp["full_attention"]["factor"], rp["sliding_attention"]["rope_theta"])
    # SigLIP So400m/14 (Gemma 3's vision_config) at 448 px: 32² patches pooled 2x2 to mm_tokens_per_image = 256
    assert (c.vision_width, c.vision_depth, c.vision_heads, c.vision_mlp, c.patch_size) == (1152, 27, 16, 4304, 14)
    assert (c.image_size, c.vision_tokens, c.vision_projector) == (448, 256, "gemma3")
