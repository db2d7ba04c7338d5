"""Small random transformers models (the reference side of the Gemma 3 / SigLIP / PaliGemma parity and import
tests), built with transformers' own classes and saved with ``save_pretrained``."""
import math

import torch
import transformers

WINDOW = 6
# our rule for global_every=2 written out by hand: layers 1 and 3 (0-based) global, 0 and 2 local
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
IMAGE_TOKEN = 300


def randomize(model, seed=0):
    """Every parameter random (HF initialises norms and Gemma 3's projector to zero, which would hide them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.1 if p.dim() == 1 else 0.5 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def vision_config():
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=7, vision_use_head=False)


def gemma3():
    """Gemma3ForConditionalGeneration: 28 px SigLIP (4x4 patches pooled to 4 tokens), a 4-layer Gemma 3 decoder."""
    text = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        layer_types=LAYER_TYPES, max_position_embeddings=256,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision_config(), mm_tokens_per_image=4,
                                    image_token_index=IMAGE_TOKEN)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = randomize(transformers.Gemma3ForConditionalGeneration(cfg))
    model.config.text_config._attn_implementation = "eager"
    return model


def gemma_text(layers=2, width=64):
    return transformers.GemmaConfig(vocab_size=300, hidden_size=width, intermediate_size=96, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                    hidden_activation="gelu_pytorch_tanh")


def paligemma():
    """PaliGemmaForConditionalGeneration: 28 px SigLIP (16 patch tokens, linear projector), a 2-layer Gemma."""
    cfg = transformers.PaliGemmaConfig(text_config=gemma_text().to_dict(), vision_config=vision_config().to_dict(),
                                       image_token_index=IMAGE_TOKEN, projection_dim=64)
    cfg.vision_config.projection_dim = 64
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = randomize(transformers.PaliGemmaForConditionalGeneration(cfg))
    model.config.text_config._attn_implementation = "eager"
    return model
