"""Tokenizers of the VLA policy: Chain-of-Causation text (word level) and (accel, curvature) action bins.

Text
----
A FIXED word vocabulary (``VOCAB``): special tokens, punctuation, the digits 0-9 (numbers are
written digit by digit, "35" -> "3" "5") and the words of the CoC grammar (``roadloop.reasoning``
templates and the parser's synonyms).  Capitalised words are encoded as ``<cap>`` + lower-case
word.  ``decode(encode(t)) == t`` for every label text (single spaces, no space before , . ;,
digits of one number joined).  The ids are part of a checkpoint's contract: append new words at
the END of ``_WORDS`` only (``VOCAB_SHA`` is stored in checkpoints and checked on load).

Actions
-------
A 6.4 s plan is 16 action tokens; each holds one (acceleration m/s^2, curvature 1/m) pair for
``ACTION_CHUNK`` = 4 steps (0.4 s), the chunk's mean control, quantised into ``ACCEL_BINS`` /
``CURV_BINS`` (41) bins with non-uniform centres, dense near 0: ``c_i = max * sign(u_i) * |u_i|^2``,
``u_i`` uniform in [-1, 1] (accel: 0.025 m/s^2 spacing at 0, ~0.3 m/s^2 at 1.5 m/s^2, 1 m/s^2 at the
limit; curvature: 5e-4 1/m at 0, 0.02 1/m at the limit).  ``quantize_controls`` uses error feedback
(sigma-delta): each step's rounding error is carried into the next step, so the integrated
speed / heading follow the continuous controls to within one bin * 0.4 s instead of drifting with
a constant bias; the round-trip plan error for expert plans is about 0.1 m mean (see the tests and
docs/LOG.md).  Why chunks: the decoder emits one token per 0.4 s instead of two per 0.1 s (16 vs
128 sequential decoding steps), which is what makes a batch-1 decision fit in the latency budget.
"""

from __future__ import annotations

import hashlib
import re

import torch

from roadloop.sim.dynamics import ActionBounds

PAD, BOS, EOS, UNK, ACT, CAP = "<pad>", "<bos>", "<eos>", "<unk>", "<act>", "<cap>"
SPECIALS = [PAD, BOS, EOS, UNK, ACT, CAP]
PUNCT = [",", ".", ";"]
DIGITS = [str(i) for i in range(10)]
_WORDS = """
a about accelerate ahead an and are at away barrel barrier because bike block brake bus car change clear come
cone cones continue crossing current cyclist decelerate down front green halt hold in intersection intrude into
is junction keep lane lanes left light maintain make move moving n't narrow need never no not nudge object
obstacle of on path pedestrian people person red reaches reduce right road roundabout same shift side signal
since sign slightly slow slowing so speed stay steady stop stopped that the there to traffic truck turn unknown
up van vehicle waiting while yellow m with
""".split()
VOCAB: list[str] = SPECIALS + PUNCT + DIGITS + _WORDS
assert len(set(VOCAB)) == len(VOCAB), "duplicate vocabulary entry"
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID, ACT_ID, CAP_ID = (TOKEN_ID[s] for s in SPECIALS)
VOCAB_SIZE = len(VOCAB)
VOCAB_SHA = hashlib.sha256("\n".join(VOCAB).encode()).hexdigest()[:16]
# tokens the text head may never emit (masked to -inf in the model's text distribution)
FORBIDDEN_IN_TEXT = [PAD_ID, BOS_ID, ACT_ID]

_SPLIT = re.compile(r"[A-Za-z']+|\d|[,.;]|\S")


def token_spans(text: str) -> list[tuple[int, int, int]]:
    """(token id, start, end) of each token of ``text`` (no ``<bos>`` / ``<eos>``): character span
    [start, end) the token stands for (``<cap>`` shares its word's span, "don't" splits into "do" "n't")."""
    out = []
    for m in _SPLIT.finditer(text):
        piece, a, e = m.group(), m.start(), m.end()
        if piece.lower() != piece:
            if piece[:1].isupper() and piece[1:].lower() == piece[1:]:
                out.append((CAP_ID, a, e))
                piece = piece.lower()
            else:
                out.append((UNK_ID, a, e))
                continue
        if piece.endswith("n't") and piece != "n't" and piece[:-3] in TOKEN_ID:  # "don't" -> "do" "n't"
            out += [(TOKEN_ID[piece[:-3]], a, e - 3), (TOKEN_ID["n't"], e - 3, e)]
            continue
        out.append((TOKEN_ID.get(piece, UNK_ID), a, e))
    return out


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Text -> token ids (unknown words -> ``<unk>``); optional ``<bos>`` / ``<eos>`` around it."""
    return ([BOS_ID] if bos else []) + [i for i, _, _ in token_spans(text)] + ([EOS_ID] if eos else [])


def span_weights(texts: list[str], spans: list[list[tuple[int, int]]], length: int, weight: float) -> torch.Tensor:
    """(B, length) float32 per-token weights of ``encode_batch(texts, length)``: ``weight`` for the tokens
    overlapping any character span of their text in ``spans``, 1 elsewhere (``<eos>`` and pads included)."""
    out = torch.ones(len(texts), length)
    for b, (t, sp) in enumerate(zip(texts, spans, strict=True)):
        for j, (_, a, e) in enumerate(token_spans(t)[:length]):
            if any(a < s1 and s0 < e for s0, s1 in sp):
                out[b, j] = weight
    return out


def decode(ids: list[int] | torch.Tensor) -> str:
    """Token ids -> text; stops at ``<eos>``, skips ``<pad>`` / ``<bos>`` / ``<act>``."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    out: list[str] = []
    cap = False
    prev = ""
    for i in ids:
        if i == EOS_ID:
            break
        if i in (PAD_ID, BOS_ID, ACT_ID) or not 0 <= i < VOCAB_SIZE:
            continue
        if i == CAP_ID:
            cap = True
            continue
        w = VOCAB[i]
        if cap:
            w = w[:1].upper() + w[1:]
            cap = False
        glue = not out or w in PUNCT or w == "n't" or (w.isdigit() and prev.isdigit())
        out.append(w if glue else " " + w)
        prev = w
    return "".join(out)


def pad_batch(seqs: list[list[int]], length: int, pad: int = PAD_ID) -> torch.Tensor:
    """Right-pad / truncate id lists to a (B, length) int64 tensor."""
    out = torch.full((len(seqs), length), pad, dtype=torch.int64)
    for b, s in enumerate(seqs):
        s = s[:length]
        if s:
            out[b, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return out


def encode_batch(texts: list[str], length: int) -> torch.Tensor:
    """Texts -> (B, length) int64 model targets: tokens + ``<eos>``, right-padded with ``<pad>`` (truncated)."""
    return pad_batch([encode(t, eos=True) for t in texts], length)


def decode_batch(ids: torch.Tensor) -> list[str]:
    """(B, L) ids -> B texts."""
    return [decode(row) for row in ids.tolist()]


# ---------------------------------------------------------------------------------------------
# actions

ACCEL_BINS = 41
ACTION_CHUNK = 4  # 0.1 s steps per action token (16 tokens for a 6.4 s plan)
CURV_BINS = 41
_BOUNDS = ActionBounds()


def bin_centres(n: int, limit: float, power: float = 2.0) -> torch.Tensor:
    """(n,) symmetric bin centres in [-limit, limit], dense near 0 (n odd: one centre at exactly 0)."""
    u = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    return (limit * torch.sign(u) * u.abs() ** power).float()


ACCEL_CENTRES = bin_centres(ACCEL_BINS, max(-_BOUNDS.accel_min, _BOUNDS.accel_max))
CURV_CENTRES = bin_centres(CURV_BINS, _BOUNDS.curvature_max)


def nearest_bin(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape of x) of the bin centre (sorted (n,)) nearest to each value of x."""
    edges = 0.5 * (centres[1:] + centres[:-1])
    return torch.bucketize(x.contiguous(), edges.to(x.device))


def chunk_controls(controls: torch.Tensor, chunk: int = ACTION_CHUNK) -> torch.Tensor:
    """(..., 64, 2) per-step controls -> (..., 64 / chunk, 2) chunk means (what a held control must be
    to give the same speed / heading change over the chunk, to first order)."""
    T = controls.shape[-2]
    if chunk < 1 or T % chunk:
        raise ValueError(f"action chunk {chunk} must divide the {T} plan steps")
    return controls.reshape(*controls.shape[:-2], T // chunk, chunk, 2).mean(-2)


def quantize_controls(controls: torch.Tensor, chunk: int = ACTION_CHUNK, feedback: bool = True) -> torch.Tensor:
    """(B, 64, 2) accel m/s^2, curvature 1/m -> (B, 64 / chunk, 2) int64 bin ids (accel bin, curvature bin).

    Each token holds one (accel, curvature) pair for ``chunk`` consecutive 0.1 s steps (the chunk's
    mean).  ``feedback``: carry each token's rounding error into the next one (sigma-delta), so the
    integrated controls (speed, heading) stay within one bin of the originals.
    """
    c = chunk_controls(controls.float(), chunk)
    ca, ck = ACCEL_CENTRES.to(c.device), CURV_CENTRES.to(c.device)
    if not feedback:
        return torch.stack((nearest_bin(c[..., 0], ca), nearest_bin(c[..., 1], ck)), -1)
    out = torch.empty(c.shape, dtype=torch.int64, device=c.device)
    err = torch.zeros(c.shape[:-2] + (2,), device=c.device)
    lo = torch.tensor([float(ca[0]), float(ck[0])], device=c.device)
    hi = torch.tensor([float(ca[-1]), float(ck[-1])], device=c.device)
    for t in range(c.shape[-2]):
        want = torch.minimum(torch.maximum(c[..., t, :] + err, lo), hi)
        ia, ik = nearest_bin(want[..., 0], ca), nearest_bin(want[..., 1], ck)
        out[..., t, 0], out[..., t, 1] = ia, ik
        err = want - torch.stack((ca[ia], ck[ik]), -1)
    return out


def dequantize(tokens: torch.Tensor, chunk: int = ACTION_CHUNK) -> torch.Tensor:
    """(..., N, 2) int64 bin ids -> (..., N * chunk, 2) float32 per-step controls (bin centres, held)."""
    ca, ck = ACCEL_CENTRES.to(tokens.device), CURV_CENTRES.to(tokens.device)
    c = torch.stack((ca[tokens[..., 0]], ck[tokens[..., 1]]), -1)
    return c.repeat_interleave(chunk, dim=-2) if chunk > 1 else c


__all__ = ["ACCEL_BINS", "ACCEL_CENTRES", "ACTION_CHUNK", "ACT_ID", "BOS_ID", "CAP_ID", "CURV_BINS",
           "CURV_CENTRES", "EOS_ID", "PAD_ID", "UNK_ID", "VOCAB", "VOCAB_SHA", "VOCAB_SIZE", "chunk_controls",
           "decode", "decode_batch", "dequantize", "encode", "encode_batch", "nearest_bin", "pad_batch",
           "quantize_controls", "span_weights", "token_spans"]
