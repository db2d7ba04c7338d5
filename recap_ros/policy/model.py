"""The π0.6*-style flow-matching VLA in PyTorch (reference implementation, training and ONNX export source).

Anchor: openpi ``pi0_pytorch.py`` (PaliGemma + Gemma action expert). Structure:

* :class:`VisionEncoder` — SigLIP-class ViT per view; its patch grid is average-pooled to ``vision_tokens``
  tokens (π0.6: 448 px / 14 = 32² patches -> 16² = 256 tokens) and projected to the backbone width.
* :class:`KeypointEncoder` — the small-data alternative (conv net + spatial-softmax keypoints), optionally
  FiLM-conditioned on the prompt (``vision_film``, RT-1).
* :class:`PrefixEncoder` — Gemma-class decoder (RMSNorm, GQA + RoPE, GeGLU) over
  ``[image tokens | prompt | state token? | advantage segment]``. Prefix tokens attend bidirectionally among
  themselves (prefix-LM as in π0); the advantage segment attends to the prefix and itself, and the prefix NEVER
  attends to it, so one KV cache serves the conditional and the unconditional CFG branch (the latter masks the
  segment out). Output: per-layer keys/values (the KV cache) + a validity mask (+ final hidden states, for a
  value-function head built from the same blocks).
* :class:`ActionExpert` — a smaller transformer of the SAME depth and attention geometry; layer l of the expert
  attends to [prefix KV of backbone layer l | its own suffix tokens]. Flow-time conditioning: ``adarms``
  (π0.5: a time MLP modulates every RMSNorm with scale/shift/gate) or ``concat`` (π0: action + time MLP).
* :class:`Pi06Policy` — both (+ a training-only goal head, ``goal_dim``: :meth:`Pi06Policy.predict_goal`), plus
  :meth:`Pi06Policy.denoise` (Euler from t = 1 (noise) to t = 0, classifier-free
  guidance v = v_u + β (v_c − v_u) with both branches as ONE batch sharing the prefix KV and the initial noise).

Flow matching convention (openpi): x_t = t·noise + (1 − t)·actions, target u = noise − actions, Euler
x ← x + dt·v with dt = −1/steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recap_ros.policy.config import PolicyConfig
from recap_ros.policy.errors import PolicyError

NEG = -3.0e4  # additive mask value, finite in fp16; every query row keeps at least itself (no empty softmax)


# --------------------------------------------------------------------------------------------- building blocks
def rms_normalize(x, eps: float):
    """x / rms(x), written as ONNX Runtime's SimplifiedLayerNormalization pattern (fused into one kernel)."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) · (1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return rms_normalize(x, self.eps) * (1.0 + self.weight)


class AdaRMSNorm(nn.Module):
    """π0.5 adaptive RMSNorm: the conditioning vector gives scale, shift and a residual gate."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.mod = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x, cond):
        scale, shift, gate = self.mod(cond)[:, None, :].chunk(3, dim=-1)
        return rms_normalize(x, self.eps) * (1.0 + scale) + shift, gate


def rotary(pos, inv_freq):
    """cos, sin tables (B, 1, S, D/2) for positions pos (B, S) float; computed once per sequence, shared by layers."""
    ang = pos[:, None, :, None] * inv_freq
    return torch.cos(ang), torch.sin(ang)


def rope(x, rot):
    """Rotary embedding of x (B, H, S, D) with the :func:`rotary` tables."""
    cos, sin = rot
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attend(q, k, v, bias=None, past=None):
    """Grouped-query attention without repeating KV heads. q (B, Hq, S, D); k, v (B, Hkv, S', D); bias (B, S, L)
    additive over the keys [past | k]. ``past`` = (keys, values) (B, Hkv, P, D) of the cached prefix: its scores are
    computed separately and joined before the softmax, so the prefix KV is never copied (no concat per layer)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * s, d) * (1.0 / math.sqrt(d))
    scores = torch.matmul(qg, k.transpose(-1, -2))
    if past is not None:
        scores = torch.cat([torch.matmul(qg, past[0].transpose(-1, -2)), scores], -1)
    kv_len = scores.shape[-1]
    if bias is not None:
        scores = (scores.reshape(b, hkv, g, s, kv_len) + bias[:, None, None]).reshape(b, hkv, g * s, kv_len)
    probs = torch.softmax(scores, dim=-1)
    if past is None:
        out = torch.matmul(probs, v)
    else:
        n = past[1].shape[2]
        out = torch.matmul(probs[..., :n], past[1]) + torch.matmul(probs[..., n:], v)
    return out.reshape(b, hq, s, d)


def mask_bias(allowed):
    return torch.where(allowed, 0.0, NEG)


class GeGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Attention(nn.Module):
    """Q/K/V/O projections of one decoder layer (GQA geometry shared by backbone and expert). ``qk_norm``
    (Gemma 3): an RMSNorm over each query and key head before RoPE."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None

    def qkv(self, x, rot):
        b, s, _ = x.shape
        q = self.q(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, rot), rope(k, rot), v

    def out(self, attn):
        b, _, s, _ = attn.shape
        return self.o(attn.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer. With ``cond_dim`` its norms are adaptive (adaRMS) and residuals gated; with
    ``sandwich`` (Gemma 3) the attention and MLP outputs are RMS-normalised too before they join the residual."""

    def __init__(self, dim: int, mlp_dim: int, heads: int, kv_heads: int, head_dim: int, cond_dim: int = 0,
                 qk_norm: bool = False, sandwich: bool = False):
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads, head_dim, qk_norm)
        self.mlp = GeGLU(dim, mlp_dim)
        if cond_dim:
            self.norm1, self.norm2 = AdaRMSNorm(dim, cond_dim), AdaRMSNorm(dim, cond_dim)
        else:
            self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.post_norm1 = RMSNorm(dim) if sandwich else None
        self.post_norm2 = RMSNorm(dim) if sandwich else None

    def _norm(self, norm, x, cond):
        if cond is None:
            return norm(x), None
        return norm(x, cond)

    def forward(self, x, rot, bias, cond=None, past_kv=None):
        """Returns (x, k, v) where k, v are THIS segment's keys/values (to cache). ``past_kv`` = prefix KV."""
        h, gate = self._norm(self.norm1, x, cond)
        q, k, v = self.attn.qkv(h, rot)
        a = self.attn.out(attend(q, k, v, bias, past_kv))
        if self.post_norm1 is not None:
            a = self.post_norm1(a)
        x = x + (a if gate is None else a * gate)
        h, gate = self._norm(self.norm2, x, cond)
        m = self.mlp(h)
        if self.post_norm2 is not None:
            m = self.post_norm2(m)
        return x + (m if gate is None else m * gate), k, v


class ViTBlock(nn.Module):
    """SigLIP-style encoder block: LayerNorm, multi-head attention with biases, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attend(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class VisionEncoder(nn.Module):
    """Images (N, 3, H, W) in [-1, 1] -> (N, vision_tokens, out_dim)."""

    def __init__(self, cfg: PolicyConfig, out_dim: int):
        super().__init__()
        self.grid = cfg.image_size // cfg.patch_size
        self.side = round(cfg.vision_tokens ** 0.5)
        self.patch = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, cfg.vision_width) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp)
                                    for _ in range(cfg.vision_depth))
        self.ln = nn.LayerNorm(cfg.vision_width, eps=1e-6)
        gemma3 = cfg.vision_projector == "gemma3"
        self.proj_norm = RMSNorm(cfg.vision_width) if gemma3 else None  # Gemma 3's soft-embedding norm
        self.proj = nn.Linear(cfg.vision_width, out_dim, bias=not gemma3)

    def forward(self, img):
        x = self.patch(img)  # (N, C, g, g)
        n, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x).transpose(1, 2).reshape(n, c, self.grid, self.grid)
        k = self.grid // self.side
        if k > 1:
            x = F.avg_pool2d(x, k)
        x = x.flatten(2).transpose(1, 2)
        return self.proj(x if self.proj_norm is None else self.proj_norm(x))


KEYPOINT_TEMPERATURE = 3.0  # initial softmax temperature per standard deviation of a heatmap (learned)


def spatial_keypoints(heat, grid, temperature):
    """Spatial softmax. heat (N, K, pixels), grid (pixels, 2) -> (N, K, 3): the softmax-expected (x, y) of each
    heatmap and its peakedness (log-mean-exp / temperature: 0 for a flat map, up to the peak's z-score).

    Each heatmap is standardised over its pixels first, so the softmax (at ``temperature`` per standard deviation)
    picks out what stands out in THIS image from the start of training; raw heatmaps of a fresh conv net vary by
    ~0.04 over an image and every keypoint would sit at the image centre, giving the policy nothing to learn from."""
    z = (heat - heat.mean(-1, keepdim=True)) / (heat.std(-1, keepdim=True) + 1e-6)
    logits = z * temperature
    xy = torch.matmul(torch.softmax(logits, -1), grid)
    peak = (torch.logsumexp(logits, -1, keepdim=True) - math.log(logits.shape[-1])) / temperature
    return torch.cat([xy, peak], -1)


class KeypointEncoder(nn.Module):
    """Images (B·N, 3, H, W) in [-1, 1] -> (B·N, vision_tokens, out_dim) through spatial-softmax keypoints.

    The encoder of ACT / Diffusion Policy-class visuomotor policies (Levine et al. 2016 spatial softmax), which
    learns where things are from a few hundred demonstrations: conv features -> ``vision_tokens`` heatmaps ->
    softmax over the pixels -> expected image coordinates (x, y) and peakedness of each heatmap
    (:func:`spatial_keypoints`). Each keypoint becomes one token: an MLP of (x, y, peakedness) plus a learned
    embedding of (view, heatmap), so the backbone can tell which keypoint (e.g. which colour) of which camera a
    token is."""

    def __init__(self, cfg: PolicyConfig, out_dim: int):
        super().__init__()
        c, k = cfg.vision_width, cfg.vision_tokens
        self.views, self.k = cfg.num_cameras, k
        self.stem = nn.Conv2d(3, c, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(cfg.vision_depth))
        self.heat = nn.Conv2d(c, k, 1)
        self.log_temp = nn.Parameter(torch.tensor(math.log(KEYPOINT_TEMPERATURE)))
        side = cfg.image_size // 2
        axis = torch.linspace(-1.0, 1.0, side)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(side * side, 2)
        self.register_buffer("grid", grid, persistent=False)  # (pixels, 2): x, y of each heatmap pixel
        self.fc1, self.fc2 = nn.Linear(3, out_dim), nn.Linear(out_dim, out_dim)
        self.embed = nn.Parameter(torch.randn(self.views, k, out_dim))
        self.film = None
        if cfg.vision_film:  # zero-initialised: a fresh model starts as the unconditioned encoder
            self.film = nn.ModuleList(nn.Linear(cfg.width, 2 * c) for _ in range(cfg.vision_depth + 1))
            for lin in self.film:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def _film(self, x, i: int, cond):
        if self.film is None:
            return x
        scale, shift = self.film[i](cond).chunk(2, dim=-1)
        return x * (1.0 + scale[..., None, None]) + shift[..., None, None]

    def keypoints(self, img, cond=None):
        """(N, 3, H, W) -> (N, vision_tokens, 3): x, y, peakedness of each heatmap. ``cond`` (N, width): the
        FiLM conditioning (with ``vision_film``)."""
        x = self._film(F.gelu(self.stem(img)), 0, cond)
        for i, blk in enumerate(self.blocks):
            x = self._film(x + F.gelu(blk(x)), i + 1, cond)
        return spatial_keypoints(self.heat(x).flatten(2), self.grid, torch.exp(self.log_temp))

    def forward(self, img, cond=None):
        tok = self.fc2(F.gelu(self.fc1(self.keypoints(img, cond))))
        n = tok.shape[0] // self.views
        return (tok.reshape(n, self.views, self.k, -1) + self.embed).reshape(n * self.views, self.k, -1)


def _inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return theta ** (-torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2))


def decoder_stack(cfg: PolicyConfig, dim: int, mlp_dim: int, cond_dim: int = 0) -> nn.ModuleList:
    """``cfg.depth`` decoder layers of width ``dim`` with the config's attention geometry and Gemma 3 options."""
    return nn.ModuleList(DecoderLayer(dim, mlp_dim, cfg.heads, cfg.kv_heads, cfg.head_dim, cond_dim, cfg.qk_norm,
                                      cfg.sandwich_norm) for _ in range(cfg.depth))


class LayerTypes(nn.Module):
    """Per layer type (0 global, 1 local), the attention bias and RoPE tables of one segment of queries.

    Global layers: RoPE base ``rope_theta`` with positions divided by ``rope_scale`` (Gemma 3's linear scaling);
    local layers (Gemma 3's 5 of every 6): base ``rope_local_theta`` and, with ``sliding_window``, only keys whose
    position differs from the query's by less than the window (a bidirectional window in the prefix, HF
    Gemma 3's rule ``q - window < k <= q`` for causal queries). Without ``global_every`` every layer is global."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.window = cfg.sliding_window
        self.local = [cfg.layer_is_local(i) for i in range(cfg.depth)]
        self.register_buffer("inv_freq", _inv_freq(cfg.head_dim, cfg.rope_theta) / cfg.rope_scale, persistent=False)
        self.register_buffer("inv_freq_local", _inv_freq(cfg.head_dim, cfg.rope_local_theta), persistent=False)

    def contexts(self, allowed, q_pos, k_pos):
        """allowed (B, S, L) bool, q_pos (B, S), k_pos (B, L) float -> [(bias, rot) global, (bias, rot) local]."""
        ctx = [(mask_bias(allowed), rotary(q_pos, self.inv_freq))]
        if any(self.local):
            if self.window:
                near = (q_pos[:, :, None] - k_pos[:, None, :]).abs() < self.window
                allowed = allowed & near
            ctx.append((mask_bias(allowed), rotary(q_pos, self.inv_freq_local)))
        return ctx

    def run(self, layers, x, ctx, cond=None, past=None):
        """x through ``layers`` with each layer's context; ``past`` = (keys, values) stacked per layer.
        Returns x and the per-layer keys and values of this segment."""
        keys, values = [], []
        for i, layer in enumerate(layers):
            rot_bias = ctx[1 if self.local[i] else 0]
            x, k, v = layer(x, rot_bias[1], rot_bias[0], cond, None if past is None else (past[0][i], past[1][i]))
            keys.append(k)
            values.append(v)
        return x, keys, values


def prefix_positions(kv_mask):
    """RoPE positions of the prefix tokens: the number of valid tokens before each (float math: TensorRT-friendly)."""
    return (torch.cumsum(kv_mask.float(), 1) - 1.0).clamp(min=0.0)


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W, 3) uint8 [0, 255] or float [0, 1] -> (B, N, 3, H, W) float32 in [-1, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (x * 2.0 - 1.0).permute(0, 1, 4, 2, 3)


# --------------------------------------------------------------------------------------------- prefix
class PrefixEncoder(nn.Module):
    """Vision + prompt (+ state token) + advantage segment through the backbone -> per-layer KV cache."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = (KeypointEncoder if cfg.vision_encoder == "keypoints" else VisionEncoder)(cfg, cfg.width)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        # Gemma scales embeddings by sqrt(width), so they are initialised at 1/sqrt(width): ~1 per element in the
        # residual stream, like the image tokens. (nn.Embedding's N(0, 1) made text tokens ~sqrt(width) times
        # larger, so attention updates could barely change them.)
        nn.init.normal_(self.embed.weight, std=cfg.width ** -0.5)
        self.state_proj = nn.Linear(cfg.state_dim, cfg.width) if cfg.state_input == "prefix" else None
        self.layers = decoder_stack(cfg, cfg.width, cfg.mlp_dim)
        self.norm = RMSNorm(cfg.width)
        self.types = LayerTypes(cfg)
        # blocks: prefix = 0, advantage segment = 1; j is visible to i iff valid[j] and block[j] <= block[i].
        # Every token also sees itself, so padded rows never have an empty softmax.
        seq = cfg.prefix_len
        block = torch.zeros(seq, dtype=torch.long)
        block[seq - cfg.max_advantage_tokens:] = 1
        self.register_buffer("block_allowed", block[None, :] <= block[:, None], persistent=False)
        self.register_buffer("self_allowed", torch.eye(seq, dtype=torch.bool), persistent=False)

    def forward(self, images, tokens, token_mask, adv_tokens, adv_mask, state=None):
        """images (B, N, 3, H, W) in [-1, 1]; tokens/token_mask (B, T); adv_tokens/adv_mask (B, A); state (B, D).

        Returns keys, values (depth, B, kv_heads, L, head_dim), kv_mask (B, L) bool, hidden (B, L, width).
        """
        cfg = self.cfg
        b, n = images.shape[:2]
        scale = math.sqrt(cfg.width)
        text = self.embed(tokens) * scale
        flat = images.reshape(b * n, *images.shape[2:])
        if cfg.vision_film:  # every view is conditioned on the prompt's mean token embedding
            m = token_mask.float()[..., None]
            cond = (text * m).sum(1) / m.sum(1).clamp(min=1.0)
            img = self.vision(flat, cond.repeat_interleave(n, 0))
        else:
            img = self.vision(flat)
        img = img.reshape(b, n * cfg.vision_tokens, cfg.width)
        parts = [img, text]
        valid = [torch.ones(b, img.shape[1], dtype=torch.bool, device=img.device), token_mask]
        if self.state_proj is not None:
            parts.append(self.state_proj(state)[:, None])
            valid.append(torch.ones(b, 1, dtype=torch.bool, device=img.device))
        parts.append(self.embed(adv_tokens) * scale)
        valid.append(adv_mask)
        x = torch.cat(parts, 1)
        kv_mask = torch.cat(valid, 1)
        allowed = (kv_mask[:, None, :] & self.block_allowed[None]) | self.self_allowed[None]
        pos = prefix_positions(kv_mask)
        x, keys, values = self.types.run(self.layers, x, self.types.contexts(allowed, pos, pos))
        return torch.stack(keys), torch.stack(values), kv_mask, self.norm(x)


# --------------------------------------------------------------------------------------------- expert
def sinusoidal(t, dim: int, min_period: float = 4e-3, max_period: float = 4.0):
    """openpi's sine-cosine flow-time embedding. t (B,) -> (B, dim)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float32, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    ang = t[:, None] * (2 * math.pi / period)[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class ActionExpert(nn.Module):
    """Noisy action chunk + flow time (+ state) -> velocity, attending to the prefix KV layer by layer."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        we = cfg.expert_width
        self.action_in = nn.Linear(cfg.action_dim, we)
        self.action_out = nn.Linear(we, cfg.action_dim)
        self.state_proj = nn.Linear(cfg.state_dim, we) if cfg.state_input == "suffix" else None
        adarms = cfg.time_conditioning == "adarms"
        if adarms:
            self.time_in, self.time_out = nn.Linear(we, we), nn.Linear(we, we)
        else:
            self.time_in, self.time_out = nn.Linear(2 * we, we), nn.Linear(we, we)
        self.layers = decoder_stack(cfg, we, cfg.expert_mlp_dim, we if adarms else 0)
        self.norm = AdaRMSNorm(we, we) if adarms else RMSNorm(we)
        self.types = LayerTypes(cfg)
        n_state = 1 if self.state_proj is not None else 0
        s = n_state + cfg.chunk_len
        # suffix blocks (π0): the state token sees the prefix and itself; action tokens see everything before
        block = torch.ones(s, dtype=torch.long)
        block[:n_state] = 0
        self.register_buffer("suffix_allowed", block[None, :] <= block[:, None], persistent=False)

    def attention_context(self, kv_mask):
        """Per layer type, (mask bias, rotary tables) of the suffix for a prefix validity mask; constant over the
        denoise steps."""
        b, s = kv_mask.shape[0], self.suffix_allowed.shape[0]
        allowed = torch.cat([kv_mask[:, None, :].expand(b, s, kv_mask.shape[1]),
                             self.suffix_allowed[None].expand(b, s, s)], 2)
        pos = kv_mask.float().sum(1, keepdim=True) + torch.arange(s, device=kv_mask.device, dtype=torch.float32)[None]
        return self.types.contexts(allowed, pos, torch.cat([prefix_positions(kv_mask), pos], 1))

    def forward(self, keys, values, kv_mask, x_t, t, state=None, context=None):
        """keys/values (depth, B, kv_heads, L, hd); kv_mask (B, L) bool; x_t (B, H, A); t (B,) or (1,) (one flow time
        for the whole batch); state (B, D).
        ``context``: :meth:`attention_context` of kv_mask, when the caller hoists it out of a loop."""
        cfg = self.cfg
        b = x_t.shape[0]
        act = self.action_in(x_t)
        temb = sinusoidal(t, cfg.expert_width)
        if cfg.time_conditioning == "adarms":
            cond = F.silu(self.time_out(F.silu(self.time_in(temb))))
        else:
            te = temb[:, None, :].expand(b, cfg.chunk_len, cfg.expert_width)
            act = self.time_out(F.silu(self.time_in(torch.cat([act, te], -1))))
            cond = None
        x = act if self.state_proj is None else torch.cat([self.state_proj(state)[:, None], act], 1)
        ctx = context if context is not None else self.attention_context(kv_mask)
        x, _, _ = self.types.run(self.layers, x, ctx, cond, (keys, values))
        x = self.norm(x) if cond is None else self.norm(x, cond)[0]
        return self.action_out(x[:, -cfg.chunk_len:])


# --------------------------------------------------------------------------------------------- policy
class Pi06Policy(nn.Module):
    """The whole policy. ``state`` and actions are NORMALISED here (see :mod:`recap_ros.policy.normalize`)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.config = cfg.validate()
        self.prefix = PrefixEncoder(cfg)
        self.expert = ActionExpert(cfg)
        self.goal_head = (nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.goal_dim))
                          if cfg.goal_dim else None)

    def predict_goal(self, hidden, kv_mask):
        """The auxiliary goal head (training only): mean of the prefix's final hidden states over its valid tokens
        (the advantage segment excluded, so the goal never depends on the indicator) -> (B, goal_dim)."""
        if self.goal_head is None:
            raise PolicyError("this model has no goal head (model config goal_dim = 0)")
        n_adv = self.config.max_advantage_tokens
        m = kv_mask[:, :-n_adv].to(hidden.dtype)[..., None]
        return self.goal_head((hidden[:, :-n_adv] * m).sum(1) / m.sum(1).clamp(min=1.0))

    def encode_prefix(self, images, tokens, token_mask, adv_tokens, adv_mask, state=None):
        """images (B, N, H, W, 3) uint8 (or float [0, 1]) -> keys, values, kv_mask (the shared prefix KV cache)."""
        keys, values, kv_mask, _ = self.prefix(images_to_float(images), tokens, token_mask, adv_tokens, adv_mask,
                                               state)
        return keys, values, kv_mask

    def velocity(self, keys, values, kv_mask, state, x_t, t):
        return self.expert(keys, values, kv_mask, x_t, t, state)

    def cfg_batch(self, keys, values, kv_mask, state):
        """The CFG batch [conditional B | unconditional B] over ONE prefix KV cache (built with the
        "Advantage: positive" segment); the unconditional half masks that segment out, i.e. sees no indicator."""
        n_adv = self.config.max_advantage_tokens
        uncond_mask = torch.cat([kv_mask[:, :-n_adv], torch.zeros_like(kv_mask[:, -n_adv:])], 1)
        return (torch.cat([keys, keys], 1), torch.cat([values, values], 1), torch.cat([kv_mask, uncond_mask], 0),
                None if state is None else torch.cat([state, state], 0))

    def guided_velocity(self, keys2, values2, kv_mask2, state2, x_t, t, beta, context=None):
        """v_u + β (v_c − v_u) from the :meth:`cfg_batch` tensors; x_t (B, ...) is shared by both branches, and so is
        the flow time t (1,) (:meth:`denoise`), whose conditioning broadcasts over the batch of 2B."""
        b = x_t.shape[0]
        v = self.expert(keys2, values2, kv_mask2, torch.cat([x_t, x_t], 0), t, state2, context)
        v_c, v_u = v[:b], v[b:]
        return v_u + beta.reshape(-1, 1, 1) * (v_c - v_u)

    def denoise(self, keys, values, kv_mask, state, noise, steps: int, beta=None):
        """Euler integration from t = 1 (noise) to t = 0. ``beta`` None: conditional branch only (β = 1);
        a tensor (B,) or (1,): batched CFG. Returns normalised actions (B, H, A). Everything that is constant
        over the steps (the CFG batch of the KV cache, masks, positions) is built once, outside the loop."""
        if beta is not None:
            keys, values, kv_mask, state = self.cfg_batch(keys, values, kv_mask, state)
        context = self.expert.attention_context(kv_mask)
        dt = -1.0 / steps
        x = noise
        for i in range(steps):
            # one flow time for every sample (and both CFG branches): its conditioning is computed once and
            # broadcasts, and the exported graph's norm scales are per-feature vectors (ONNX Runtime's fused
            # RMSNorm runs a (2, 1, D) scale on a slow path)
            t = torch.full((1,), 1.0 + i * dt, dtype=noise.dtype, device=noise.device)
            if beta is None:
                v = self.expert(keys, values, kv_mask, x, t, state, context)
            else:
                v = self.guided_velocity(keys, values, kv_mask, state, x, t, beta, context)
            x = x + dt * v
        return x

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"vision": count(self.prefix.vision), "backbone": count(self.prefix) - count(self.prefix.vision),
                "expert": count(self.expert), "total": count(self)}
