"""LeRobot's side of bench/lerobot_parity.py; runs in the bench's own virtual environment (lerobot installed, never
recap_ros). Builds LeRobot's PI05Policy with random weights at the smallest variants (gemma_300m backbone,
gemma_300m expert; SigLIP So400m/14 at 224 px; its projector resized to the backbone's width, see below), saves it with save_pretrained, and runs PI05Pytorch.sample_actions
on one random observation (one camera), prompt tokens and noise; writes inputs and the action chunk to io.npz.

    <venv>/bin/python bench/lerobot_pi05_worker.py OUT_DIR
"""
import sys
from pathlib import Path

import numpy as np
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.policies.pi05.modeling_pi05 import PI05Policy

STATE_DIM, ACTION_DIM, PROMPT_TOKENS, VALID_TOKENS = 14, 14, 200, 37


def main(out: Path) -> None:
    torch.manual_seed(0)
    cfg = PI05Config(paligemma_variant="gemma_300m", action_expert_variant="gemma_300m", dtype="float32",
                     device="cpu", num_inference_steps=10,
                     input_features={"observation.images.base_0_rgb": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)),
                                     "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
                     output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))})
    policy = PI05Policy(cfg).eval()
    # LeRobot 0.5.1 hard-codes the PaliGemma projector's output at 2048 (gemma_2b's width), so a gemma_300m backbone
    # fails at the first image; the projector is resized to the backbone's width (1024), nothing else changes
    projector = policy.model.paligemma_with_expert.paligemma.model.multi_modal_projector
    projector.linear = torch.nn.Linear(projector.linear.in_features, 1024)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb every weight: LeRobot zero-initialises the adaptive norms' dense layers
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    policy.save_pretrained(out / "policy")
    model = policy.model
    image = torch.rand(1, 3, 224, 224, generator=g) * 2 - 1  # SigLIP input range [-1, 1]
    tokens = torch.randint(0, 257152, (1, PROMPT_TOKENS), generator=g)
    masks = torch.arange(PROMPT_TOKENS)[None] < VALID_TOKENS  # right padding, as LeRobot's tokenizer step pads
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    with torch.no_grad():
        actions = model.sample_actions([image], [torch.ones(1, dtype=torch.bool)], tokens, masks, noise=noise,
                                       num_steps=10)
    np.savez(out / "io.npz", image=image.numpy(), tokens=tokens.numpy(), masks=masks.numpy(), noise=noise.numpy(),
             actions=actions.float().numpy())
    print(f"lerobot pi05: {sum(p.numel() for p in policy.parameters()) / 1e6:.0f} M parameters, chunk "
          f"{tuple(actions.shape)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
