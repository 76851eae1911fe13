"""A small decoder-only vision-language-action transformer (Alpamayo-R1 in miniature).

Sequence (one causal transformer, learned absolute positions, pre-LN blocks)::

    [16 BEV tokens] [ego history] [command] <bos> t_0 ... t_{L-1} <act> c_0 c_1 ... c_14
     \\__________ prefix P = 18 __________/     \\_ L text slots _/       \\_ action chunks _/

* BEV: the (frames, C, H, W) raster with the frames stacked as channels (4 x 13 = 52), turned into
  (64 / ``patch``)^2 tokens by the ``stem``: ``conv`` (default) is log2(``patch``) 3x3 stride-2
  convolutions (52 -> 48 -> 96 -> d_model channels, then d_model, GELU between; "early
  convolutions", Xiao et al. 2021), ``patch`` one linear map per ``patch`` x ``patch`` px patch (a
  Conv2d with stride = kernel).  On the same data and steps the convolutional stem measured lower
  minADE_6 and higher grounding (docs/LOG.md).  ``patch`` 16 (default) gives 4 x 4 vision tokens,
  a sequence of 67 tokens against the 115 of ``patch`` 8 (8 x 8 tokens, the earlier models), and
  the transformer's cost scales with it.  In the 30-minute imitation budget on a 2-core CPU the 16
  coarser tokens win: 2.4x the training samples per second (with bf16) buy more passes than the
  finer view is worth (docs/LOG.md, 2026-11-23).
* Text slots hold the CoC tokens + ``<eos>`` then ``<pad>``; pads are masked out as attention keys,
  so a sequence is equivalent to the same one with its pads removed (sampling skips them).
* Action tokens: one per 0.4 s chunk (``action_chunk`` = 4 steps, 16 for 6.4 s), holding an accel
  bin and a curvature bin (``tokenizer.quantize_controls``); embedded as accel + curvature +
  chunk-index embeddings.  The hidden state at ``<act>`` predicts chunk 0 and the one at chunk j
  predicts chunk j+1 through two heads (accel bins, curvature bins) that are conditionally
  independent given the prefix, so log p(chunk) = log p(accel) + log p(curvature), exactly.
  16 sequential decoding steps instead of 128 (two tokens per 0.1 s step) is what keeps a
  batch-1 decision inside the latency budget; docs/LOG.md has the measurements.

``sample`` decodes with a KV cache; the returned log-probabilities are those of the sampled
tokens under the model's own distribution (temperature 1, no top-p), i.e. exactly what
``log_prob`` computes by teacher forcing (needed for GRPO ratios).

Batches (dicts of tensors): ``bev`` (B, F, C, H, W) float, ``history`` (B, 16, 5) float,
``command`` (B,) int64, and for teacher forcing ``text`` (B, L) int64 (tokens, ``<eos>``, ``<pad>``)
and ``actions`` (B, 16, 2) int64 bins (accel, curvature per chunk).  Fine-tuning the top blocks only
(``trainable_parameters('top:K')``): ``lower_states`` runs the embeddings and the lower blocks once,
and a teacher-forcing batch ``{"text", "actions", "lower"}`` starts from those hidden states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from roadloop.errors import RoadloopError
from roadloop.io import atomic_write_bytes
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.observe import CHANNELS, COMMANDS, RasterConfig

FORMAT = "roadloop-vla/1"
STEMS = ("conv", "patch")
TRAINABLE = r"all|top:(\d+)"  # ``VLAModel.trainable_parameters`` specs
GREEDY_ACTIONS = ("mean", "mode")  # how greedy decoding picks action bins (VLAModel.sample)


def check_greedy_actions(value: str) -> str:
    """``value`` if it is one of ``GREEDY_ACTIONS``, else a ``RoadloopError`` naming them."""
    if value not in GREEDY_ACTIONS:
        raise RoadloopError(f"greedy_actions must be one of {', '.join(GREEDY_ACTIONS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class VLAConfig:
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    raster_channels: int = len(CHANNELS)
    frames: int = 4
    raster_size: int = 64
    # the raster's geometry (``observe.RasterConfig``): m per pixel, and the share of the image behind the ego;
    # the default 0.75 m / 0.15 sees 41 m ahead.  Imitation takes both from its demonstrations.
    raster_resolution: float = 0.75
    raster_ego_offset: float = 0.15
    patch: int = 16  # raster px per vision token side: 16 -> 4 x 4 tokens, 8 -> 8 x 8
    history_steps: int = 16
    history_features: int = 5
    n_commands: int = len(COMMANDS)
    text_vocab: int = tok.VOCAB_SIZE
    max_text_len: int = 32
    plan_steps: int = 64
    action_chunk: int = tok.ACTION_CHUNK
    accel_bins: int = tok.ACCEL_BINS
    curv_bins: int = tok.CURV_BINS
    dropout: float = 0.0
    # vision tokens: "conv" (log2(patch) stride-2 3x3 convolutions, GELU between) or "patch" (one linear map per
    # patch x patch px, the first models' stem; checkpoints whose config.json predates the key are "patch")
    stem: str = "conv"

    def validate(self) -> VLAConfig:
        if self.d_model % self.n_heads:
            raise RoadloopError(f"VLAConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.raster_size % self.patch:
            raise RoadloopError(f"VLAConfig.raster_size ({self.raster_size}) must be divisible by patch ({self.patch})")
        for name in ("d_model", "n_layers", "n_heads", "max_text_len", "plan_steps", "action_chunk"):
            if getattr(self, name) < 1:
                raise RoadloopError(f"VLAConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.raster_channels != len(CHANNELS):
            raise RoadloopError(f"VLAConfig.raster_channels is {self.raster_channels} but the observation code draws "
                                f"{len(CHANNELS)} channels ({', '.join(CHANNELS)}): a model for an older raster "
                                f"format; train it again on newly collected demonstrations")
        try:
            self.raster_config()  # RasterConfig checks the raster's size, geometry and frames
        except ValueError as err:
            raise RoadloopError(f"VLAConfig.raster_*: {err}") from None
        if self.stem not in STEMS:
            raise RoadloopError(f"VLAConfig.stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        if self.stem == "conv" and self.patch not in (8, 16, 32):
            raise RoadloopError(f"VLAConfig.stem='conv' downsamples by patch with log2(patch) stride-2 convolutions; "
                                f"it needs patch 8, 16 or 32, got patch={self.patch}")
        if self.plan_steps % self.action_chunk:
            raise RoadloopError(f"VLAConfig.action_chunk ({self.action_chunk}) must divide plan_steps "
                                f"({self.plan_steps})")
        return self

    def raster_config(self) -> RasterConfig:
        """The raster this model reads: its size, geometry and frames (``observe.render_bev``)."""
        return RasterConfig(size=self.raster_size, resolution=self.raster_resolution,
                            ego_offset=self.raster_ego_offset, frames=self.frames)

    @property
    def n_action(self) -> int:
        """Action tokens per plan (plan_steps / action_chunk)."""
        return self.plan_steps // self.action_chunk

    @property
    def n_patches(self) -> int:
        return (self.raster_size // self.patch) ** 2

    @property
    def prefix_len(self) -> int:
        """Vision tokens + history token + command token."""
        return self.n_patches + 2

    @property
    def seq_len(self) -> int:
        return self.prefix_len + 1 + self.max_text_len + 1 + self.n_action - 1

    @staticmethod
    def preset(name: str) -> VLAConfig:
        if name not in PRESETS:
            raise RoadloopError(f"unknown VLA preset '{name}'; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


PRESETS: dict[str, VLAConfig] = {
    "tiny": VLAConfig(d_model=64, n_layers=2, n_heads=2),
    "default": VLAConfig(),
    "large": VLAConfig(d_model=512, n_layers=8, n_heads=8, patch=8),  # for a GPU: the finer 8 x 8 vision tokens
}


class _Cache:
    """Per-layer key / value buffers (B, H, Smax, dh) + key validity (B, Smax); ``n`` filled slots."""

    def __init__(self, cfg: VLAConfig, B: int, smax: int, device: torch.device, dtype: torch.dtype):
        dh = cfg.d_model // cfg.n_heads
        self.k = [torch.zeros(B, cfg.n_heads, smax, dh, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.valid = torch.zeros(B, smax, dtype=torch.bool, device=device)
        self.n = 0

    def repeat_rows(self, r: int) -> None:
        """Each row becomes r consecutive rows (B -> B r), with its first ``n`` (filled) slots; the other
        slots are left unset (a slot is written before anything reads it)."""
        n = self.n

        def rep(t: torch.Tensor, dim: int) -> torch.Tensor:
            out = t.new_empty((t.shape[0] * r, *t.shape[1:]))
            out.narrow(dim, 0, n).copy_(t.narrow(dim, 0, n).repeat_interleave(r, 0))
            return out

        self.k = [rep(k, 2) for k in self.k]
        self.v = [rep(v, 2) for v in self.v]
        self.valid = rep(self.valid, 1)


class _BlockWeights(NamedTuple):
    """One block's tensors, fetched once per decode: at batch 1 the ``nn.Module`` attribute lookups
    of a layer cost about as much as its arithmetic (docs/LOG.md, 2026-12-06)."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    heads: int
    eps: float
    p_drop: float  # dropout probability in effect (0 in eval mode)


def _block(x: torch.Tensor, w: _BlockWeights, layer: int, cache: _Cache, mask: torch.Tensor) -> torch.Tensor:
    """A pre-LN transformer block on x (B, T, d): appends its keys / values at ``cache.n`` of layer
    ``layer`` and attends over the cache's first n + T slots under ``mask`` (B or 1, 1, T, n + T)."""
    ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b, heads, eps, p = w
    B, T, d = x.shape
    h = F.layer_norm(x, (d,), ln1_w, ln1_b, eps)
    q, k, v = F.linear(h, qkv_w, qkv_b).view(B, T, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    n = cache.n
    kc, vc = cache.k[layer], cache.v[layer]
    kc.narrow(2, n, T).copy_(k)  # narrow, not kc[:, :, n:n + T]: multi-axis indexing is slow at batch 1
    vc.narrow(2, n, T).copy_(v)
    a = F.scaled_dot_product_attention(q, kc.narrow(2, 0, n + T), vc.narrow(2, 0, n + T), attn_mask=mask)
    a = F.linear(a.transpose(1, 2).reshape(B, T, d), proj_w, proj_b)
    x = x + (F.dropout(a, p, True) if p > 0 else a)
    h = F.layer_norm(x, (d,), ln2_w, ln2_b, eps)
    h = F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)
    return x + (F.dropout(h, p, True) if p > 0 else h)


class _Block(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        d = cfg.d_model
        self.h = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def weights(self) -> _BlockWeights:
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return _BlockWeights(self.ln1.weight, self.ln1.bias, self.qkv.weight, self.qkv.bias, self.proj.weight,
                             self.proj.bias, self.ln2.weight, self.ln2.bias, fc1.weight, fc1.bias, fc2.weight,
                             fc2.bias, self.h, self.ln1.eps, self.drop.p if self.training else 0.0)

    def forward(self, x: torch.Tensor, layer: int, cache: _Cache, mask: torch.Tensor) -> torch.Tensor:
        return _block(x, self.weights(), layer, cache, mask)


class VLAModel(nn.Module):
    """Decoder-only VLA transformer (see module docstring).  Device / dtype follow the parameters.

    The convolutional stem runs in the memory layout of its input: channels-last where the raster
    is laid out (B, H, W, F, C) in memory (``decode_raster(..., channels_last=True)`` in the trainers,
    ``render_bev(..., channels_last=True)`` in the live policy from ``CHANNELS_LAST_MIN_BATCH`` scenes
    up: oneDNN's CPU convolutions are faster on it, docs/LOG.md 2026-12-06), else (B, C, H, W) (the
    live policy's smaller batches).  The same function either way; the last bits may differ."""

    def __init__(self, cfg: VLAConfig | None = None):
        super().__init__()
        cfg = (cfg or VLAConfig()).validate()
        self.cfg = cfg
        d = cfg.d_model
        cin = cfg.frames * cfg.raster_channels
        if cfg.stem == "conv":  # early convolutions (Xiao et al. 2021): 64 -> 32 -> 16 -> 8 px, GELU between
            w = max(32, d // 4)
            layers: list[nn.Module] = [nn.Conv2d(cin, w, 3, 2, 1), nn.GELU(), nn.Conv2d(w, 2 * w, 3, 2, 1), nn.GELU(),
                                       nn.Conv2d(2 * w, d, 3, 2, 1)]
            for _ in range(int(math.log2(cfg.patch)) - 3):  # patch 16 / 32: 8 -> 4 (-> 2) px, d channels
                layers += [nn.GELU(), nn.Conv2d(d, d, 3, 2, 1)]
            self.conv = nn.Sequential(*layers)
        else:
            self.patch = nn.Conv2d(cin, d, cfg.patch, stride=cfg.patch)
        self.history = nn.Sequential(nn.Linear(cfg.history_steps * cfg.history_features, d), nn.GELU(),
                                     nn.Linear(d, d))
        self.command = nn.Embedding(cfg.n_commands, d)
        self.text_emb = nn.Embedding(cfg.text_vocab, d)
        self.accel_emb = nn.Embedding(cfg.accel_bins, d)
        self.curv_emb = nn.Embedding(cfg.curv_bins, d)
        self.step_emb = nn.Embedding(cfg.n_action, d)
        self.pos_emb = nn.Parameter(torch.randn(cfg.seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab)
        self.accel_head = nn.Linear(d, cfg.accel_bins)
        self.curv_head = nn.Linear(d, cfg.curv_bins)
        # history features scale: x, y (m), cos, sin, speed (m/s)
        self.register_buffer("hist_scale", torch.tensor([1 / 20, 1 / 20, 1.0, 1.0, 1 / 10]), persistent=False)
        forbid = torch.zeros(cfg.text_vocab, dtype=torch.bool)
        forbid[[i for i in tok.FORBIDDEN_IN_TEXT if i < cfg.text_vocab]] = True
        self.register_buffer("text_forbid", forbid, persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:  # scaled residual init
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(b.mlp[2].weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    # ------------------------------------------------------------------ fine-tuning subsets
    def trainable_parameters(self, spec: str = "all") -> list[nn.Parameter]:
        """The parameters a fine-tuning run trains, by ``spec``; the others get ``requires_grad=False``.

        ``all``: every parameter.  ``top:K`` (0 <= K <= n_layers): the last K transformer blocks, the
        final layer norm and the three output heads (text, acceleration, curvature); the vision stem, the
        embeddings and the lower blocks stay as they are.  Backpropagation then stops at the lowest
        trainable block, so a learning step costs the forward pass plus the top blocks' backward pass."""
        m = re.fullmatch(TRAINABLE, spec)
        if m is None:
            raise RoadloopError(f"trainable must be 'all' or 'top:K' (K transformer blocks from the top), got {spec!r}")
        if spec == "all":
            keep = list(self.parameters())
        else:
            k = int(m.group(1))
            if k > self.cfg.n_layers:
                raise RoadloopError(f"trainable={spec!r}: the model has {self.cfg.n_layers} blocks")
            mods = [*self.blocks[self.cfg.n_layers - k:], self.ln_f, self.text_head, self.accel_head, self.curv_head]
            keep = [p for mod in mods for p in mod.parameters()]
        ids = {id(p) for p in keep}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)
        return keep

    def frozen_blocks(self) -> int:
        """How many of the lowest blocks are frozen together with everything below them (vision stem,
        embeddings, positions): the hidden states after them do not change while training, so
        ``lower_states`` may be computed once per batch (``requires_grad`` as set by
        ``trainable_parameters``)."""
        below = [p for n, p in self.named_parameters() if not n.startswith(("blocks.", "ln_f.", "text_head.",
                                                                            "accel_head.", "curv_head."))]
        if any(p.requires_grad for p in below):
            return 0
        return next((i for i, b in enumerate(self.blocks) if any(p.requires_grad for p in b.parameters())),
                    self.cfg.n_layers)

    # ------------------------------------------------------------------ positions
    @property
    def device(self) -> torch.device:
        return self.pos_emb.device

    @property
    def _p_bos(self) -> int:
        return self.cfg.prefix_len

    @property
    def _p_act(self) -> int:
        return self.cfg.prefix_len + 1 + self.cfg.max_text_len

    # ------------------------------------------------------------------ embeddings
    def _prefix(self, obs: dict) -> torch.Tensor:
        """(B, P+1, d): vision, history, command, <bos> tokens with positions."""
        cfg = self.cfg
        bev = obs["bev"].to(self.device, self.pos_emb.dtype)
        B = bev.shape[0]
        C, P, n = cfg.frames * cfg.raster_channels, cfg.patch, cfg.raster_size // cfg.patch
        if cfg.stem == "conv":
            # a view; channels-last when the raster is laid out so (the (B, d, h, w) output is then token-major)
            x = bev.reshape(B, C, cfg.raster_size, cfg.raster_size)
            vis = self.conv(x).flatten(2).transpose(1, 2)
        else:
            # the stride = kernel Conv2d as one matmul over unfolded patches (same weights; ~1.7x faster
            # forward + backward on CPU than the convolution)
            x = bev.reshape(B, C, n, P, n, P).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, C * P * P)
            vis = F.linear(x, self.patch.weight.reshape(self.patch.out_channels, -1), self.patch.bias)  # (B, Np, d)
        hist = obs["history"].to(self.device, self.pos_emb.dtype) * self.hist_scale
        h = self.history(hist.reshape(B, -1)).unsqueeze(1)
        c = self.command(obs["command"].to(self.device)).unsqueeze(1)
        bos = self.text_emb(torch.full((B, 1), tok.BOS_ID, device=self.device))
        return torch.cat((vis, h, c, bos), 1) + self.pos_emb[: cfg.prefix_len + 1]

    def _action_emb(self, ids: torch.Tensor, slot0: int) -> torch.Tensor:
        """(B, T, 2) (accel, curvature) bins of chunks slot0 .. slot0+T-1 -> (B, T, d) with positions."""
        T = ids.shape[1]
        slots = torch.arange(slot0, slot0 + T, device=self.device)
        e = self.accel_emb(ids[..., 0]) + self.curv_emb(ids[..., 1]) + self.step_emb(slots)
        return e + self.pos_emb[self._p_act + 1 + slots]

    # ------------------------------------------------------------------ transformer
    def _decoder_weights(self) -> tuple[list[_BlockWeights], torch.Tensor, torch.Tensor, float]:
        """The blocks' tensors and the final norm's (weight, bias, eps), for ``_run``: fetched once per
        decode instead of once per generated token."""
        return [b.weights() for b in self.blocks], self.ln_f.weight, self.ln_f.bias, self.ln_f.eps

    def _run(self, x: torch.Tensor, cache: _Cache, valid: torch.Tensor,
             weights: tuple[list[_BlockWeights], torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        """Append tokens x (B, T, d) with key validity (B, T) to the cache; return final hidden states.
        ``weights``: ``_decoder_weights()`` if already fetched."""
        blocks, ln_w, ln_b, eps = self._decoder_weights() if weights is None else weights
        B, T, d = x.shape
        n = cache.n
        cache.valid.narrow(1, n, T).copy_(valid)
        keys = cache.valid.narrow(1, 0, n + T).unsqueeze(1).unsqueeze(1)  # (B, 1, 1, n + T)
        if T == 1:  # decoding step: every cached key is in the past
            mask = keys
        else:
            kpos = torch.arange(n + T, device=x.device)
            qpos = torch.arange(n, n + T, device=x.device)
            mask = (kpos[None, :] <= qpos[:, None])[None, None] & keys
        for i, w in enumerate(blocks):
            x = _block(x, w, i, cache, mask)
        cache.n = n + T
        return F.layer_norm(x, (d,), ln_w, ln_b, eps)

    def _text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.text_head(h).masked_fill(self.text_forbid, float("-inf"))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Teacher forcing.  Returns logits: ``text`` (B, L, V) predicting ``batch['text']``,
        ``accel`` (B, N, NA) and ``curv`` (B, N, NK) predicting ``batch['actions']`` (N = n_action).

        With ``batch['lower']`` (from ``lower_states`` of the same batch) the sequence starts from those
        hidden states and runs the blocks above them only; the logits are identical to a full pass as
        long as the embeddings and the lower blocks have not changed since."""
        cfg = self.cfg
        text = batch["text"].to(self.device)
        actions = batch["actions"].to(self.device)
        B, L = text.shape
        if L != cfg.max_text_len:
            raise RoadloopError(f"text must have {cfg.max_text_len} slots (VLAConfig.max_text_len), got {L}")
        if tuple(actions.shape) != (B, cfg.n_action, 2):
            raise RoadloopError(f"actions must have shape (B, {cfg.n_action}, 2) (one (accel, curvature) bin pair "
                                f"per {cfg.action_chunk}-step chunk), got {tuple(actions.shape)}")
        P1 = cfg.prefix_len + 1
        lower = batch.get("lower")
        if lower is None:
            x, first = self._teacher_tokens(batch, text, actions), 0
        else:
            x, first = lower["hidden"].to(self.device), int(lower["layers"])
        h = self.ln_f(self._teacher_blocks(x, text, first, cfg.n_layers))
        ht = h[:, P1 - 1:P1 - 1 + L]
        ha = h[:, self._p_act:self._p_act + cfg.n_action]
        return {"text": self._text_logits(ht), "accel": self.accel_head(ha), "curv": self.curv_head(ha)}

    def _teacher_tokens(self, batch: dict, text: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, S, d) input embeddings of the teacher-forcing sequence: prefix, text, <act>, actions but the last."""
        B, L = text.shape
        pre = self._prefix(batch)
        P1 = pre.shape[1]
        te = self.text_emb(text) + self.pos_emb[P1:P1 + L]
        act = self.text_emb(torch.full((B, 1), tok.ACT_ID, device=self.device)) + self.pos_emb[self._p_act]
        ae = self._action_emb(actions[:, :-1], 0)
        return torch.cat((pre, te, act, ae), 1)

    def _teacher_blocks(self, x: torch.Tensor, text: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Blocks ``first`` .. ``last`` - 1 over a whole teacher-forcing sequence x (B, S, d) whose text
        slots hold ``text`` (B, L) (pads are invalid keys); causal mask, no final norm."""
        B, S, _ = x.shape
        P1 = self.cfg.prefix_len + 1
        valid = torch.ones(B, S, dtype=torch.bool, device=self.device)
        valid[:, P1:P1 + text.shape[1]] = text != tok.PAD_ID
        cache = _Cache(self.cfg, B, S, self.device, x.dtype)
        cache.valid[:] = valid
        pos = torch.arange(S, device=x.device)
        mask = (pos[None, :] <= pos[:, None])[None, None] & valid[:, None, None, :]
        for i in range(first, last):
            x = self.blocks[i].forward(x, i, cache, mask)
        return x

    @torch.no_grad()
    def lower_states(self, batch: dict, layers: int) -> dict[str, torch.Tensor | int]:
        """Hidden states (B, S, d) after the first ``layers`` blocks of the teacher-forcing sequence, as
        ``batch['lower']`` for ``forward`` / ``token_logps``: when only the blocks above them train
        (``trainable_parameters('top:K')``, layers = n_layers - K), they are computed once per batch."""
        cfg = self.cfg
        if not 0 <= layers <= cfg.n_layers:
            raise RoadloopError(f"lower_states: layers must be in [0, {cfg.n_layers}], got {layers}")
        text = batch["text"].to(self.device)
        actions = batch["actions"].to(self.device)
        x = self._teacher_tokens(batch, text, actions)
        return {"hidden": self._teacher_blocks(x, text, 0, layers), "layers": layers}

    def token_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token log-probs: text (B, L) (0 at pads), accel + curv (B, N, 2); text mask (B, L)."""
        out = self.forward(batch)
        text = batch["text"].to(self.device)
        actions = batch["actions"].to(self.device)
        mask = text != tok.PAD_ID
        lt = torch.log_softmax(out["text"].float(), -1).gather(-1, text.unsqueeze(-1)).squeeze(-1)
        lt = torch.where(mask, lt, 0.0)
        la = torch.log_softmax(out["accel"].float(), -1).gather(-1, actions[..., :1])
        lk = torch.log_softmax(out["curv"].float(), -1).gather(-1, actions[..., 1:])
        return lt, torch.cat((la, lk), -1), mask

    def loss(self, batch: dict, action_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Mean token cross-entropies: ``text_loss`` (over non-pad slots; weighted by ``batch["text_weight"]``
        (B, L) where given), ``action_loss`` (over the 2 N accel and curvature bins),
        ``loss = text_loss + action_weight * action_loss``."""
        lt, la, mask = self.token_logps(batch)
        w = mask.float()
        if batch.get("text_weight") is not None:
            w = w * batch["text_weight"].to(w.device)
        text_loss = -(lt * w).sum() / w.sum().clamp_min(1e-6)
        action_loss = -la.mean()
        return {"loss": text_loss + action_weight * action_loss, "text_loss": text_loss, "action_loss": action_loss}

    def log_prob(self, obs: dict, text_ids: torch.Tensor, action_tokens: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact log-likelihood (B,), (B,) of text (B, L) (pads ignored) and actions (B, N, 2) given obs."""
        lt, la, _ = self.token_logps({**obs, "text": text_ids, "actions": action_tokens})
        return lt.sum(1), la.sum((1, 2))

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None) -> torch.Tensor:
        """Choose one id per row from logits (B, V): argmax if temperature <= 0, else inverse-CDF
        sampling of the temperature / nucleus distribution with uniforms u (B,)."""
        if temperature <= 0 or u is None:
            return logits.argmax(-1)
        p = torch.softmax(logits.float() / temperature, -1)
        ps, idx = torch.sort(p, dim=-1, descending=True, stable=True)
        cum = ps.cumsum(-1)
        keep = (cum - ps) < top_p  # smallest prefix whose mass reaches top_p (always >= 1 token)
        ps = torch.where(keep, ps, 0.0)
        cum = ps.cumsum(-1)
        j = torch.searchsorted(cum, (u.to(cum.device) * cum[:, -1]).unsqueeze(-1).contiguous(), right=True)
        j = torch.minimum(j, keep.sum(-1, keepdim=True) - 1)
        return idx.gather(-1, j).squeeze(-1)

    @staticmethod
    def _uniforms(gens, B: int, n: int) -> torch.Tensor:
        """(B, n) uniforms for a whole decode, drawn up front so that a row's draws do not depend on
        how long the other rows of the batch keep decoding."""
        if gens is None:
            return torch.rand(B, n)
        if isinstance(gens, torch.Generator):
            return torch.rand(B, n, generator=gens)
        return torch.stack([torch.rand(n, generator=g) for g in gens])

    @torch.no_grad()
    def sample(self, obs: dict, temperature: float = 1.0, top_p: float = 0.95,
               generator: torch.Generator | list[torch.Generator] | None = None, greedy_actions: str = "mean",
               repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Autoregressive decoding with a KV cache.

        ``generator``: one CPU generator for the batch, or one per row (results then do not depend on
        the batch composition), or None (global RNG).  temperature <= 0: greedy text, and action
        tokens by ``greedy_actions``: ``mean`` (default: the bin nearest the mean control of each
        chunk's distribution, the minimum-squared-error choice; each chunk still conditions on the
        bins chosen before it) or ``mode`` (the most likely bin).  ``mean`` keeps the plan with the
        text more often (docs/LOG.md: open-loop consistency +4-5 points).
        ``repeat`` = r: r samples of each observation row (RoaD's K candidates), rows b r .. b r + r - 1
        of the outputs (and of a per-row ``generator`` list); the prefix (vision stem, history, command)
        and its pass through the blocks run once per observation, its cached keys / values are repeated
        (the samples equal those of the observations repeated r times, up to float rounding).
        Returns text_ids (B, L) (tokens, ``<eos>``, pads), action_tokens (B, N, 2), logp_text (B,),
        logp_action (B,) (log-likelihood under the model, = ``log_prob``).
        """
        check_greedy_actions(greedy_actions)
        if repeat < 1:
            raise RoadloopError(f"VLAModel.sample: repeat must be >= 1, got {repeat}")
        cfg = self.cfg
        greedy = temperature <= 0
        # every tensor the loop needs, fetched once: per-token module calls and attribute lookups cost
        # about as much as the arithmetic at batch 1 (the same operations, bit for bit)
        dw = self._decoder_weights()
        text_w, text_b, forbid = self.text_head.weight, self.text_head.bias, self.text_forbid
        emb_text, pos = self.text_emb.weight, self.pos_emb
        acc_w, acc_b, curv_w, curv_b = self.accel_head.weight, self.accel_head.bias, self.curv_head.weight, \
            self.curv_head.bias
        emb_acc, emb_curv, emb_step = self.accel_emb.weight, self.curv_emb.weight, self.step_emb.weight
        pre = self._prefix(obs)
        B, P1, _ = pre.shape
        L = cfg.max_text_len
        cache = _Cache(cfg, B, cfg.seq_len, self.device, pre.dtype)
        h = self._run(pre, cache, torch.ones(B, P1, dtype=torch.bool, device=self.device), dw).select(1, -1)
        if repeat > 1:
            cache.repeat_rows(repeat)
            h = h.repeat_interleave(repeat, 0)
            B *= repeat
        if isinstance(generator, list | tuple) and len(generator) != B:
            raise RoadloopError(f"VLAModel.sample: {len(generator)} generators for {B} sampled rows")
        ones = torch.ones(B, 1, dtype=torch.bool, device=self.device)
        text = torch.full((B, L), tok.PAD_ID, dtype=torch.int64, device=self.device)
        lp_text = torch.zeros(B, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        N = cfg.n_action
        u = None if greedy else self._uniforms(generator, B, L + 2 * N)
        for i in range(L):
            logits = F.linear(h, text_w, text_b).masked_fill(forbid, float("-inf"))
            t = self._pick(logits, temperature, top_p, None if greedy else u.select(1, i))
            lp = torch.log_softmax(logits.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
            lp_text += torch.where(done, 0.0, lp)
            t = torch.where(done, tok.PAD_ID, t)
            text.select(1, i).copy_(t)
            done = done | (t == tok.EOS_ID)
            if bool((t == tok.PAD_ID).all()):
                break  # every row finished: the remaining pad slots are masked keys, skip them
            x = F.embedding(t, emb_text).unsqueeze(1) + pos[P1 + i]
            h = self._run(x, cache, (t != tok.PAD_ID).unsqueeze(1), dw).select(1, -1)
        x = F.embedding(torch.full((B, 1), tok.ACT_ID, device=self.device), emb_text) + pos[self._p_act]
        h = self._run(x, cache, ones, dw).select(1, -1)
        acts = torch.zeros(B, N, 2, dtype=torch.int64, device=self.device)
        lp_act = torch.zeros(B, device=self.device)
        mean = greedy and greedy_actions == "mean"
        ca, ck = tok.ACCEL_CENTRES.to(self.device), tok.CURV_CENTRES.to(self.device)
        p_act = self._p_act
        for j in range(N):
            la, lk = F.linear(h, acc_w, acc_b), F.linear(h, curv_w, curv_b)
            if mean:
                a = tok.nearest_bin(torch.softmax(la.float(), -1) @ ca, ca)
                k = tok.nearest_bin(torch.softmax(lk.float(), -1) @ ck, ck)
            else:
                a = self._pick(la, temperature, top_p, None if greedy else u.select(1, L + 2 * j))
                k = self._pick(lk, temperature, top_p, None if greedy else u.select(1, L + 2 * j + 1))
            lp_act += (torch.log_softmax(la.float(), -1).gather(-1, a.unsqueeze(-1))
                       + torch.log_softmax(lk.float(), -1).gather(-1, k.unsqueeze(-1))).squeeze(-1)
            acts[:, j].copy_(torch.stack((a, k), -1))
            if j + 1 < N:  # as _action_emb(acts[:, j:j + 1], j)
                x = (F.embedding(a, emb_acc) + F.embedding(k, emb_curv) + emb_step[j]).unsqueeze(1) + pos[p_act + 1 + j]
                h = self._run(x, cache, ones, dw).select(1, -1)
        return text, acts, lp_text, lp_act


# ---------------------------------------------------------------------------------------------
# checkpoints

def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_hash(model: nn.Module) -> str:
    """sha256 (16 hex) of the weights (safetensors bytes)."""
    from safetensors.torch import save

    return hashlib.sha256(save(_cpu_state(model))).hexdigest()[:16]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: VLAModel, path_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (config, vocab / bins fingerprint, weights hash,
    ``extra``) into ``path_dir``, each atomically (weights first; the config names their hash)."""
    from safetensors.torch import save

    path_dir = Path(path_dir)
    data = save(_cpu_state(model))
    meta = {"format": FORMAT, "config": dataclasses.asdict(model.cfg), "vocab_sha": tok.VOCAB_SHA,
            "weights_sha256": hashlib.sha256(data).hexdigest(), "params": param_count(model), "extra": extra or {}}
    atomic_write_bytes(path_dir / "model.safetensors", data)
    atomic_write_bytes(path_dir / "config.json", json.dumps(meta, indent=2, sort_keys=True).encode())
    return path_dir


def load_checkpoint(path_dir: str | Path, device: str | torch.device = "cpu") -> tuple[VLAModel, dict]:
    """Load a checkpoint written by ``save_checkpoint``; returns (model in eval mode, meta dict).

    Raises ``RoadloopError`` naming the problem: missing / corrupt files, unknown config keys,
    vocabulary mismatch, weights hash mismatch, tensor names / shapes that the config's model lacks.
    """
    from safetensors.torch import load

    path_dir = Path(path_dir)
    cpath, wpath = path_dir / "config.json", path_dir / "model.safetensors"
    for p in (cpath, wpath):
        if not p.is_file():
            raise RoadloopError(f"VLA checkpoint {path_dir}: missing {p.name}")
    try:
        meta = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RoadloopError(f"VLA checkpoint {cpath}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise RoadloopError(f"VLA checkpoint {cpath}: not a {FORMAT} config (format {meta.get('format')!r})"
                            if isinstance(meta, dict) else f"VLA checkpoint {cpath}: not a JSON object")
    fields = {f.name for f in dataclasses.fields(VLAConfig)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise RoadloopError(f"VLA checkpoint {cpath}: unknown config key(s) {unknown} "
                            f"(this code knows {sorted(fields)})")
    if meta.get("vocab_sha") != tok.VOCAB_SHA:
        raise RoadloopError(f"VLA checkpoint {cpath}: text vocabulary {meta.get('vocab_sha')} differs from this code's "
                            f"{tok.VOCAB_SHA} (tokenizer.VOCAB changed)")
    try:
        cfg = VLAConfig(**{"stem": "patch", **meta["config"]})  # written before the key existed: a patch stem
        model = VLAModel(cfg)
    except (TypeError, ValueError, RoadloopError) as e:
        raise RoadloopError(f"VLA checkpoint {cpath}: invalid config: {e}") from e
    data = wpath.read_bytes()
    want = meta.get("weights_sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise RoadloopError(f"VLA checkpoint {wpath}: weights hash does not match config.json (corrupt or replaced)")
    try:
        sd = load(data)
    except Exception as e:  # safetensors raises its own error types
        raise RoadloopError(f"VLA checkpoint {wpath}: cannot read weights ({e})") from e
    own = model.state_dict()
    missing, extra_keys = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra_keys:
        raise RoadloopError(f"VLA checkpoint {wpath}: tensors missing {missing[:5]}, unexpected {extra_keys[:5]}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise RoadloopError(f"VLA checkpoint {path_dir}: tensor '{k}' has shape {tuple(sd[k].shape)} in the "
                                f"weights but the config {_cfg_hint(cfg)} builds {tuple(v.shape)}; "
                                f"config.json does not match model.safetensors")
    model.load_state_dict(sd)
    meta["weights_hash"] = state_hash(model)
    return model.to(device).eval(), meta


def _cfg_hint(cfg: VLAConfig) -> str:
    return f"(d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads})"


__all__ = ["PRESETS", "TRAINABLE", "VLAConfig", "VLAModel", "load_checkpoint", "param_count", "save_checkpoint",
           "state_hash"]
