"""Micro-expression recognition with learned motion magnification and LSH sparse attention.

Description followed: from the onset and apex frames of a micro-expression build a sequence of
magnified frames ``I_mag,i = f(I_onset, I_apex, 1 + alpha_i)`` with increasing ``alpha_i``, where ``f``
is a learned motion-magnification network (encoder -> manipulator that scales the motion
representation, i.e. the difference of the two frames' encodings -> decoder; after Oh et al. 2018,
"Learning-based video motion magnification"). Each magnified frame goes through a ResNet-18 to give
per-frame spatial features ``F`` (T x d). Self-attention over the frames with ``Q = F W_Q``,
``K = F W_K``, ``V = F W_V`` is made sparse by locality-sensitive hashing: ``n_rounds`` random
hyperplanes hash every query and key to one of ``2**n_rounds`` buckets by the signs of their
projections, and ``softmax(q k^T / sqrt(d)) V`` is taken only over pairs in the same bucket. Spatial and
motion (attention) features are concatenated -> FC -> FC -> softmax; trained with cross-entropy.

Ambiguities in the description and the choices made here:

* alpha schedule: "alpha from 1 to 13 (1, 1.375, ..., 13: 32 values)" cannot hold at once (step 0.375
  from 1 to 13 is 33 values). We keep the count (32), the step (0.375 = 12 / 32) and the end (13) and
  treat 1 as the exclusive lower end of the range: ``alpha_i = 1 + 12 i / 32`` for i = 1..32, i.e.
  1.375, 1.75, ..., 13 (see :func:`alpha_schedule`). The magnification *factor* handed to ``f`` is
  ``1 + alpha_i`` (2.375 .. 14) as written in the description.
* magnifier details: Oh et al.'s encoder gives a texture and a shape representation; the manipulator is
  ``M_onset + h(factor * g(M_apex - M_onset))`` with ``g`` = conv+ReLU and ``h`` = conv + residual
  block (here without biases, so that no motion stays no motion at every factor), and the decoder
  fuses the apex frame's texture with the manipulated shape. Widths and block counts are scaled down
  (configurable). No normalisation layers, so train/eval behave alike. Unlike the paper, the decoder
  predicts a residual added to the apex frame (a fresh network starts near "output = apex", which lets
  it train on a CPU in a minute). It works in the model's normalised input space. It is trained with
  MSE, not the paper's L1 (see :func:`fer_core.losses.micro.magnification_loss`).
* pre-training: the ``magnifier`` network (:class:`MagnifierNet`, the same :class:`LearnedMagnifier`)
  is trained on magnified pairs (``magnifier`` task, :mod:`fer_core.training.tasks.magnifier`); its
  weights are copied into the classifier by :func:`load_magnifier_weights` (the micro task does this
  when ``data.magnifier_weights`` names a checkpoint), then frozen (``freeze_magnifier=True``) or
  fine-tuned end to end -- a recipe choice.
* the method writes ``I_mag,i = f(I_onset + (1 + α_i)|I_apex − I_onset|)``, i.e. ``f`` applied to a
  linearly amplified frame; we keep Oh et al.'s interface ``f(I_onset, I_apex, 1 + α_i)`` (the network
  the method cites), whose manipulator multiplies the motion representation by the same factor
  ``1 + α_i``: the amplification is the same, learned in feature space instead of on pixels (where the
  absolute value would also drop the motion's sign).
* the linear baseline ``I_onset + factor (I_apex - I_onset)`` is not clipped to the valid range.
* LSH: one set of hyperplanes (a seeded, non-trainable buffer) hashes both queries and keys; a zero
  projection counts as the "negative" side. ``d`` in ``sqrt(d)`` is the query/key width, 1024 by
  default (the method's Q/K size 1 x 1024; ``attn_dim``). A query whose bucket holds no key gets a
  zero output. Q, K, V projections have no bias and there is no output projection (none is
  described). W_Q and W_K are separate, as described; ``n_rounds`` (hyperplanes, 2**n_rounds
  buckets) must be > 2, as the method says.
* Empty buckets: with separate W_Q/W_K, queries and keys of one sequence are hashed independently,
  and because all frames of a clip are alike (the magnified frames differ by small motions), all
  queries of a sequence share one sign pattern and all keys another: whole sequences end with no
  query/key pair in a common bucket, the attention outputs zeros and W_Q/W_K/W_V get no gradient
  (the earlier code worked round it with a Reformer-style W_K = W_Q, outside the method). The fix
  kept inside the method's letter is a *normalisation before hashing* (``hash_norm="frames"``,
  default): each query/key coordinate is standardised over the frames of its sequence before the
  sign test, so hashing sees how a frame differs from the clip rather than the clip's common
  direction; scores and values still use the raw Q, K, V. Identical frames standardise to 0, land in
  one bucket and get dense attention. ``hash_norm="none"`` is the plain form. Normalisation alone
  only brings the pairs to independent random hashing (a query of T frames still misses all T keys
  with probability ~(1 − 2^−n_rounds)^T), so it is combined with *more rounds* in Reformer's sense:
  ``n_hashes`` (default 4) independent hashings, a query/key pair attending when it shares a bucket
  in any of them. We keep the earlier reading of the description's ``n_rounds`` as the hyperplanes
  of one hashing (2**n_rounds buckets) and give the multi-round union its own name. Measured share
  of queries with an empty bucket at initialisation (quick model, generated CASME II, 16 magnified
  frames): plain hashing 100 % at every n_hashes; normalised 52 % (1 hashing), 2.5 % (4), 0.2 % (8);
  with 4 frames 69 % / 7 % / 2 %. :meth:`LSHSelfAttention.empty_bucket_share` measures it
  (``bench/fidelity.py`` before/after training). ``shared_qk=True`` stays as an option, no profile uses it.
* "spatial features" are the per-frame ResNet features averaged over the magnified frames; "motion
  features" are the attention outputs averaged over the frames. The hidden FC has ``head_hidden`` units
  with a ReLU; the model outputs logits and their softmax.
* defaults: 3x112x112 frames, ResNet-18 with the ImageNet stem at width 64 (d = 512), Q/K/V width
  1024, 3 hashing rounds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fer_core.data.labels import CASME2_CLASSES, SMIC_CLASSES
from fer_core.models.catalog import FERModel, ModelMetadata, NetworkSpec, TensorSpec, register_model, register_network
from fer_core.training.recipe import Recipe
from fer_core.models.resnet import ResNetTrunk

FRAME_ROLES = ("onset", "apex")
MIN_ROUNDS = 3  # the method: more than 2 hashing rounds
HASH_NORMS = ("frames", "none")
DEFAULT_ATTN_DIM = 1024  # the method's Q/K size, 1 x 1024
DEFAULT_HASHES = 4  # independent hashings (Reformer's multi-round LSH) against empty buckets


def alpha_schedule(num_frames: int = 32, alpha_min: float = 1.0, alpha_max: float = 13.0) -> torch.Tensor:
    """``num_frames`` magnification amounts evenly spaced in (alpha_min, alpha_max].

    With the defaults: 1.375, 1.75, ..., 13 (step 0.375). The lower end is exclusive (see the module
    docstring for why)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not alpha_max > alpha_min:
        raise ValueError(f"alpha_max ({alpha_max}) must exceed alpha_min ({alpha_min})")
    step = (alpha_max - alpha_min) / num_frames
    return torch.tensor([alpha_min + step * i for i in range(1, num_frames + 1)], dtype=torch.float32)


def _broadcast_factors(factors: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Validate ``factors`` of shape (B,) or (B, T) and return it as (B, T)."""
    if factors.dim() == 1:
        factors = factors.unsqueeze(1)
    if not torch.jit.is_tracing() and (factors.dim() != 2 or factors.shape[0] != batch_size):
        raise ValueError(f"factors must have shape (B,) or (B, T) with B = {batch_size}, got {tuple(factors.shape)}")
    return factors


class LinearMagnifier(nn.Module):
    """Baseline ``I_onset + factor * (I_apex - I_onset)``; ``factor = 1`` returns the apex frame."""

    def magnify(self, onset: torch.Tensor, apex: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """onset, apex: (B, C, H, W); factors (B,) -> (B, C, H, W) or (B, T) -> (B, T, C, H, W)."""
        squeeze = factors.dim() == 1
        factors = _broadcast_factors(factors, onset.shape[0]).to(onset.dtype)
        out = onset.unsqueeze(1) + factors[:, :, None, None, None] * (apex - onset).unsqueeze(1)
        return out.squeeze(1) if squeeze else out

    def forward(self, onset: torch.Tensor, apex: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return self.magnify(onset, apex, factors)


class ResidualConvBlock(nn.Module):
    """conv-ReLU-conv plus identity, without normalisation (as in Oh et al.'s magnification net)."""

    def __init__(self, channels: int, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def _conv_relu(in_ch: int, out_ch: int, stride: int = 1, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=bias), nn.ReLU(inplace=True))


class LearnedMagnifier(nn.Module):
    """Encoder -> manipulator -> decoder motion magnifier (a small Oh et al. 2018).

    The encoder maps a frame to a texture representation (1/4 resolution) and a shape representation
    (1/2 resolution). The manipulator scales the shape difference ``g(M_apex - M_onset)`` by the factor,
    and the decoder renders apex texture + manipulated shape as a residual on the apex frame.
    """

    def __init__(self, in_chans: int = 3, width: int = 16, num_res_blocks: int = 1) -> None:
        super().__init__()
        if width < 1 or num_res_blocks < 0:
            raise ValueError(f"width must be >= 1 and num_res_blocks >= 0, got {width}, {num_res_blocks}")
        hidden = 2 * width

        def res_blocks(channels: int) -> list[nn.Module]:
            return [ResidualConvBlock(channels) for _ in range(num_res_blocks)]

        self.encoder = nn.Sequential(
            _conv_relu(in_chans, width), _conv_relu(width, hidden, stride=2), *res_blocks(hidden)
        )
        self.texture_head = nn.Sequential(_conv_relu(hidden, hidden, stride=2), *res_blocks(hidden))
        self.shape_head = nn.Sequential(_conv_relu(hidden, hidden), *res_blocks(hidden))
        # g and h have no biases so that zero motion stays zero for every factor (g(0) = h(0) = 0).
        self.motion_g = _conv_relu(hidden, hidden, bias=False)
        self.motion_h = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), ResidualConvBlock(hidden, bias=False)
        )
        self.decoder = nn.Sequential(
            _conv_relu(2 * hidden, hidden), *res_blocks(hidden),
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv_relu(hidden, width), nn.Conv2d(width, in_chans, 3, 1, 1),
        )

    def magnify(self, onset: torch.Tensor, apex: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """onset, apex: (B, C, H, W) with H, W divisible by 4; factors (B,) -> (B, C, H, W) or
        (B, T) -> (B, T, C, H, W)."""
        if not torch.jit.is_tracing():  # shapes are fixed by the metadata once exported
            if onset.shape != apex.shape or onset.dim() != 4:
                shapes = f"{tuple(onset.shape)}, {tuple(apex.shape)}"
                raise ValueError(f"onset and apex must both be (B, C, H, W), got {shapes}")
            if onset.shape[-1] % 4 or onset.shape[-2] % 4:
                raise ValueError(f"frame height and width must be divisible by 4, got {tuple(onset.shape[-2:])}")
        squeeze = factors.dim() == 1
        factors = _broadcast_factors(factors, onset.shape[0]).to(onset.dtype)
        batch, steps = factors.shape
        # One encoder pass over onset and apex together; only the apex frame's texture is rendered.
        encoded = self.encoder(torch.cat([onset, apex], dim=0))
        # Halves by an explicit (2, B) split, not ``chunk(2)``: chunk's count ceil(2B / B) is a guard
        # torch.export cannot prove for a symbolic batch, so the dynamo exporter would fix B.
        shape_onset, shape_apex = self.shape_head(encoded).unflatten(0, (2, batch)).unbind(0)
        texture = self.texture_head(encoded[batch:])
        motion = self.motion_g(shape_apex - shape_onset)  # (B, c, h, w)
        scaled = factors[:, :, None, None, None] * motion.unsqueeze(1)  # (B, T, c, h, w)
        shape_mag = shape_onset.unsqueeze(1) + self.motion_h(scaled.flatten(0, 1)).unflatten(0, (batch, steps))
        texture_up = F.interpolate(texture, scale_factor=2.0, mode="nearest")
        texture_up = texture_up.unsqueeze(1).expand(-1, steps, -1, -1, -1)
        fused = torch.cat([texture_up, shape_mag], dim=2).flatten(0, 1)
        out = apex.unsqueeze(1) + self.decoder(fused).unflatten(0, (batch, steps))
        return out.squeeze(1) if squeeze else out

    def forward(self, onset: torch.Tensor, apex: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return self.magnify(onset, apex, factors)


class LSHSelfAttention(nn.Module):
    """Self-attention restricted to query/key pairs that share a random-hyperplane LSH bucket.

    The bucket of a vector ``x`` is ``sum_r [x . w_r > 0] 2^r`` over ``n_rounds`` fixed hyperplanes
    ``w_r`` drawn from ``torch.Generator().manual_seed(seed)``. Everything is tensor arithmetic (no
    data-dependent Python control flow), so it traces to ONNX as is.

    With separate W_Q and W_K (the description) a query and the keys are hashed independently;
    ``hash_norm="frames"`` standardises Q and K over the frames of each sequence before hashing so
    that sequences of alike frames do not end with every bucket empty (module docstring).
    ``shared_qk=True`` ties W_K = W_Q as the Reformer does (an option outside the method).
    """

    def __init__(
        self, dim: int, attn_dim: int | None = None, n_rounds: int = 3, seed: int = 0, shared_qk: bool = False,
        hash_norm: str = "frames", n_hashes: int = 1,
    ) -> None:
        super().__init__()
        if n_rounds < MIN_ROUNDS or n_rounds > 30:
            raise ValueError(f"n_rounds must be in [{MIN_ROUNDS}, 30] (the method needs more than 2), got {n_rounds}")
        if n_hashes < 1:
            raise ValueError(f"n_hashes must be >= 1, got {n_hashes}")
        if hash_norm not in HASH_NORMS:
            raise ValueError(f"hash_norm must be one of {HASH_NORMS}, got {hash_norm!r}")
        attn_dim = attn_dim or dim
        self.attn_dim, self.n_rounds, self.seed, self.hash_norm = attn_dim, n_rounds, seed, hash_norm
        self.q_proj = nn.Linear(dim, attn_dim, bias=False)
        self.k_proj = None if shared_qk else nn.Linear(dim, attn_dim, bias=False)
        self.v_proj = nn.Linear(dim, attn_dim, bias=False)
        generator = torch.Generator().manual_seed(seed)
        self.n_hashes = n_hashes
        self.register_buffer("hyperplanes", torch.randn(attn_dim, n_rounds, generator=generator))
        # Further independent hashings (Reformer's multi-round LSH), drawn after the first from the same seed.
        self.register_buffer("extra_hyperplanes", torch.randn(n_hashes - 1, attn_dim, n_rounds, generator=generator))
        self.register_buffer("bit_values", 2 ** torch.arange(n_rounds, dtype=torch.int64), persistent=False)

    @property
    def num_buckets(self) -> int:
        return 2**self.n_rounds

    def bucket_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(..., attn_dim) -> int64 (...) bucket ids in [0, 2**n_rounds)."""
        bits = (x @ self.hyperplanes > 0).to(torch.int64)
        return (bits * self.bit_values).sum(-1)

    def _hash_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, attn_dim) -> what is hashed: x itself, or x standardised over the T frames."""
        if self.hash_norm == "none":
            return x
        centred = x - x.mean(dim=1, keepdim=True)
        return centred / (centred.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-6)

    def same_bucket(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> bool (B, T, T): query t and key u share a bucket."""
        q = self.q_proj(features)
        k = q if self.k_proj is None else self.k_proj(features)
        return self._same_bucket(q, k)

    def _same_bucket(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        hq, hk = self._hash_input(q), self._hash_input(k)
        same = self.bucket_codes(hq).unsqueeze(-1) == self.bucket_codes(hk).unsqueeze(-2)
        for planes in self.extra_hyperplanes:  # a pair attends if it shares a bucket in any hashing
            q_codes = ((hq @ planes > 0).to(torch.int64) * self.bit_values).sum(-1)
            k_codes = ((hk @ planes > 0).to(torch.int64) * self.bit_values).sum(-1)
            same = same | (q_codes.unsqueeze(-1) == k_codes.unsqueeze(-2))
        return same

    @torch.no_grad()
    def empty_bucket_share(self, features: torch.Tensor) -> float:
        """Share of the queries in ``features`` (B, T, dim) whose bucket holds no key (output zero)."""
        return float((~self.same_bucket(features).any(-1)).float().mean())

    def forward(self, features: torch.Tensor, return_weights: bool = False):
        """features (B, T, dim) -> (B, T, attn_dim) [, attention weights (B, T, T)]."""
        q, v = self.q_proj(features), self.v_proj(features)
        k = q if self.k_proj is None else self.k_proj(features)
        same_bucket = self._same_bucket(q, k)  # (B, T, T)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.attn_dim)
        # Masked softmax written out so a row without any partner gives exactly zero (not NaN).
        scores = scores.masked_fill(~same_bucket, torch.finfo(scores.dtype).min)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * same_bucket.to(scores.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        out = weights @ v
        return (out, weights) if return_weights else out


def _label_names_for(num_classes: int, label_names: Sequence[str] | None) -> tuple[str, ...]:
    if label_names is None:
        defaults = {len(CASME2_CLASSES): CASME2_CLASSES, len(SMIC_CLASSES): SMIC_CLASSES}
        return tuple(defaults.get(num_classes, [f"class_{i}" for i in range(num_classes)]))
    if len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label names for {num_classes} classes")
    return tuple(label_names)


class MicroLSH(FERModel):
    """Onset + apex frames -> magnified sequence -> per-frame ResNet-18 -> LSH attention -> classes.

    Input ``frames`` (B, 2, C, H, W), normalised with ``metadata.mean/std``; frame 0 is the onset and
    frame 1 the apex. Outputs ``logits`` and ``probabilities`` (B, num_classes).
    """

    def __init__(
        self,
        num_classes: int = len(CASME2_CLASSES),
        label_names: Sequence[str] | None = None,
        in_chans: int = 3,
        img_size: int = 112,
        width: int = 64,
        stem: str = "imagenet",
        magnifier: str = "learned",
        magnifier_width: int = 16,
        magnifier_res_blocks: int = 1,
        freeze_magnifier: bool = False,
        num_mag_frames: int = 32,
        alpha_range: tuple[float, float] = (1.0, 13.0),
        n_rounds: int = 3,
        lsh_seed: int = 0,
        shared_qk: bool = False,
        attn_dim: int | None = DEFAULT_ATTN_DIM,
        hash_norm: str = "frames",
        n_hashes: int = DEFAULT_HASHES,
        head_hidden: int = 256,
        drop_rate: float = 0.0,
        name: str = "micro_lsh",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if img_size % 4:
            raise ValueError(f"img_size must be divisible by 4 (the magnifier halves it twice), got {img_size}")
        if magnifier == "learned":
            self.magnifier: nn.Module = LearnedMagnifier(in_chans, magnifier_width, magnifier_res_blocks)
        elif magnifier == "linear":
            self.magnifier = LinearMagnifier()
        else:
            raise ValueError(f"magnifier must be 'learned' or 'linear', got {magnifier!r}")
        if freeze_magnifier:
            self.magnifier.requires_grad_(False)
        alphas = alpha_schedule(num_mag_frames, *alpha_range)
        self.register_buffer("factors", 1.0 + alphas, persistent=False)
        self.trunk = ResNetTrunk([2, 2, 2, 2], in_chans, width, stem)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.attention = LSHSelfAttention(self.trunk.num_features, attn_dim, n_rounds, lsh_seed, shared_qk, hash_norm,
                                          n_hashes)
        self.head_fc = nn.Linear(self.num_features, head_hidden)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(head_hidden, num_classes)
        labels = _label_names_for(num_classes, label_names)
        self.metadata = ModelMetadata(
            name=name, task="micro",
            inputs=(TensorSpec("frames", (2, in_chans, img_size, img_size), kind="frames",
                               labels=FRAME_ROLES, description="onset and apex frames"),),
            outputs=(
                TensorSpec("logits", (num_classes,), kind="logits", labels=labels),
                TensorSpec("probabilities", (num_classes,), kind="probabilities", labels=labels),
            ),
            mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
            label_names=labels, primary_output="logits",
            extra={
                "frame_roles": FRAME_ROLES,
                "magnifier": magnifier,
                "alphas": tuple(round(float(a), 6) for a in alphas),
                "magnification_factors": tuple(round(float(f), 6) for f in self.factors),
                "lsh_rounds": n_rounds, "lsh_buckets": 2**n_rounds, "lsh_seed": lsh_seed,
                "lsh_shared_qk": shared_qk, "lsh_hash_norm": hash_norm, "lsh_hashes": n_hashes, "attn_dim": self.attention.attn_dim,
            },
        )

    @property
    def num_features(self) -> int:
        return self.trunk.num_features + self.attention.attn_dim

    def magnified_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, H, W) onset/apex -> (B, T, C, H, W) magnified sequence, T = len(alpha schedule)."""
        if not torch.jit.is_tracing() and (x.dim() != 5 or x.shape[1] != 2):
            raise ValueError(f"expected frames of shape (B, 2, C, H, W), got {tuple(x.shape)}")
        onset, apex = x[:, 0], x[:, 1]
        factors = self.factors.unsqueeze(0).expand(x.shape[0], -1)
        return self.magnifier.magnify(onset, apex, factors)

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, H, W) -> per-frame ResNet features F of the magnified sequence (B, T, d)."""
        frames = self.magnified_frames(x)
        feats = self.pool(self.trunk(frames.flatten(0, 1))).flatten(1)
        return feats.unflatten(0, frames.shape[:2])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, H, W) -> [mean spatial features, mean LSH-attention features] (B, num_features)."""
        feats = self.frame_features(x)
        motion = self.attention(feats)
        return torch.cat([feats.mean(1), motion.mean(1)], dim=1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False):
        hidden = self.head_drop(F.relu(self.head_fc(features)))
        if pre_logits:
            return hidden
        logits = self.fc(hidden)
        return logits, logits.softmax(-1)

    def reset_classifier(self, num_classes: int, label_names: Sequence[str] | None = None) -> None:
        """New final FC for ``num_classes`` (label names default to CASME II (5) / SMIC (3))."""
        labels = _label_names_for(num_classes, label_names)
        self.fc = nn.Linear(self.fc.in_features, num_classes)
        outputs = tuple(dataclasses.replace(s, shape=(num_classes,), labels=labels) for s in self.metadata.outputs)
        self.metadata = dataclasses.replace(self.metadata, outputs=outputs, label_names=labels)


MAGNIFIER_ROLES = ("onset", "apex", "factor")


class MagnifierNet(FERModel):
    """The learned magnifier ``f`` as a network of its own, for pre-training on magnified pairs.

    Input ``frames`` (B, 3, C, H, W), normalised like :class:`MicroLSH`'s frames: onset, apex, and a
    constant *factor plane* whose mean is the magnification factor ``1 + α`` (one tensor input keeps
    the platform's single-input trainer, export and serving path). Output ``magnified`` (B, C, H, W)
    in the same normalised space. The weights live under ``magnifier.`` exactly as in
    :class:`MicroLSH`, so :func:`load_magnifier_weights` moves them across.
    """

    def __init__(self, in_chans: int = 3, img_size: int = 112, magnifier_width: int = 16,
                 magnifier_res_blocks: int = 1, name: str = "magnifier") -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be divisible by 4 (the magnifier halves it twice), got {img_size}")
        self.magnifier = LearnedMagnifier(in_chans, magnifier_width, magnifier_res_blocks)
        self.metadata = ModelMetadata(
            name=name, task="micro",
            inputs=(TensorSpec("frames", (3, in_chans, img_size, img_size), kind="frames", labels=MAGNIFIER_ROLES,
                               description="onset, apex, and a plane filled with the factor 1 + alpha"),),
            outputs=(TensorSpec("magnified", (in_chans, img_size, img_size), kind="regression",
                                description="the apex frame with its motion magnified, normalised"),),
            mean=(0.5,) * in_chans, std=(0.5,) * in_chans, primary_output="magnified",
            extra={"frame_roles": MAGNIFIER_ROLES, "magnifier_width": magnifier_width,
                   "magnifier_res_blocks": magnifier_res_blocks},
        )

    @property
    def num_features(self) -> int:
        return self.metadata.inputs[0].shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.dim() != 5 or x.shape[1] != 3):
            raise ValueError(f"expected frames of shape (B, 3, C, H, W), got {tuple(x.shape)}")
        factors = x[:, 2].mean(dim=(1, 2, 3))
        return self.magnifier.magnify(x[:, 0], x[:, 1], factors)

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        x = super().example_input(batch_size)
        x[:, 2] = 1.0 + 12.0 * torch.rand(batch_size)[:, None, None, None]
        return x


def magnifier_input(onset: torch.Tensor, apex: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) onset/apex and (B,) factors -> the (B, 3, C, H, W) input of :class:`MagnifierNet`."""
    plane = factors.to(onset.dtype)[:, None, None, None].expand_as(onset)
    return torch.stack([onset, apex, plane], dim=1)


def load_magnifier_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy the ``magnifier.*`` weights of a :class:`MagnifierNet` state dict into ``model.magnifier``.

    Raises ValueError when ``model`` has no learned magnifier or the widths differ."""
    if not isinstance(getattr(model, "magnifier", None), LearnedMagnifier):
        raise ValueError("pre-trained magnifier weights need a model with the learned magnifier (magnifier='learned')")
    weights = {k.removeprefix("magnifier."): v for k, v in state_dict.items() if k.startswith("magnifier.")}
    if not weights:
        raise ValueError("the checkpoint holds no magnifier.* weights (is it a 'magnifier' network?)")
    try:
        model.magnifier.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"the pre-trained magnifier does not fit this model's magnifier "
                         f"(magnifier_width / magnifier_res_blocks must match): {first}") from None


@register_model
def magnifier(**kwargs) -> MagnifierNet:
    """The learned motion magnifier alone (pre-training on magnified pairs; weights feed micro_lsh)."""
    return MagnifierNet(**kwargs)


@register_model
def micro_lsh(**kwargs) -> MicroLSH:
    """Learned magnification (32 factors) + ResNet-18 per frame + LSH attention; CASME II's 5 classes."""
    return MicroLSH(**kwargs)


# ---------------------------------------------------------------------------------------------
# Network spec: task, profiles, default data
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------


def _profiles() -> dict[str, Recipe]:
    paper = Recipe(
        network="micro_lsh", profile="paper",
        # Model defaults: 112 px, ResNet-18 width 64, 32 magnified frames (alpha 1..13), separate W_Q /
        # W_K of size 1 x 1024, normalised multi-hash LSH (module docstring). The learned magnifier is
        # the pre-trained ``magnifier`` network's champion, frozen (the method applies a trained f; it
        # does not fine-tune it: ``model_kwargs.freeze_magnifier: false`` is the option). Clips are
        # registered on the onset's face and cropped; classes under 10 clips are dropped (the method).
        model_kwargs={"img_size": 112, "width": 64, "magnifier": "learned", "freeze_magnifier": True,
                      "num_mag_frames": 32, "alpha_range": [1.0, 13.0], "shared_qk": False, "attn_dim": 1024,
                      "n_rounds": 3, "hash_norm": "frames", "n_hashes": 4},
        data={"val_fraction": 0.2, "test_fraction": 0.2, "face_crop": True, "min_class_clips": 10,
              "magnifier_weights": "models:/fer-magnifier@champion"},
        optimizer="adam", lr=1e-4, weight_decay=1e-4, scheduler="cosine", epochs=60, batch_size=32,
        eval_batch_size=64, early_stopping_patience=10, monitor="val/loss", monitor_mode="min", num_workers=4,
        augment={"hflip": True, "rotation_deg": 5.0, "crop_area": [0.9, 1.0], "gamma_max": 1.2,
                 "noise_var": 0.0, "erase_prob": 0.0},
    )
    quick = paper.with_overrides({
        "profile": "quick",
        # The linear magnifier: the learned one, trained end to end from scratch in a CPU-minutes
        # budget, collapsed to one class (test UF1 0.06 vs 0.51 linear on 320 generated CASME II clips,
        # held-out subjects). The paper profile loads the pre-trained magnifier instead; quick stays
        # self-contained (no magnifier version needed), and without face registration: generated clips
        # are centred faces already, and the Haar crop at 32-64 px only adds box jitter (bench/fidelity.py:
        # UF1 0.187 whole frames vs 0.087 cropped on generated CASME II).
        "model_kwargs": {"img_size": 32, "width": 8, "stem": "small", "magnifier": "linear", "num_mag_frames": 4,
                         "head_hidden": 32},
        "data": {"val_fraction": 0.2, "test_fraction": 0.2, "face_crop": False, "min_class_clips": 0},
        "lr": 2e-3, "weight_decay": 0.0, "epochs": 15, "batch_size": 16, "early_stopping_patience": 6,
        "num_workers": 0, "max_steps_per_epoch": 30,
        "augment": {"hflip": True, "rotation_deg": 0.0, "crop_area": [1.0, 1.0], "gamma_max": 1.0,
                    "noise_var": 0.0, "erase_prob": 0.0},
    })
    return {"paper": paper, "quick": quick}


register_network(NetworkSpec(
    name="micro_lsh", factory=micro_lsh, task="micro", model_class=MicroLSH,
    profiles=_profiles, data_format="casme2", dataset="casme2", primary_metric="uf1", demo_size=320,
    description="micro-expressions: onset/apex magnification + per-frame ResNet-18 + LSH self-attention",
    reference="micro-expression recognition with magnification and LSH attention (CASME II, SMIC, SAMM)",
))


def _magnifier_profiles() -> dict[str, Recipe]:
    paper = Recipe(
        network="magnifier", profile="paper",
        model_kwargs={"img_size": 112, "magnifier_width": 16, "magnifier_res_blocks": 1},
        loss_kwargs={"kind": "mse"}, data={"val_fraction": 0.2, "test_fraction": 0.2},
        optimizer="adam", lr=1e-4, weight_decay=0.0, scheduler="cosine", epochs=12, batch_size=16,
        eval_batch_size=32, early_stopping_patience=0, monitor="val/loss", monitor_mode="min", num_workers=4,
        augment={"hflip": True, "rotation_deg": 0.0, "crop_area": [1.0, 1.0], "gamma_max": 1.0,
                 "noise_var": 0.0, "erase_prob": 0.0},
    )
    quick = paper.with_overrides({
        "profile": "quick", "model_kwargs": {"img_size": 32, "magnifier_width": 8, "magnifier_res_blocks": 1},
        "lr": 2e-3, "epochs": 12, "batch_size": 16, "num_workers": 0, "max_steps_per_epoch": 30,
    })
    return {"paper": paper, "quick": quick}


# Pre-training stage of micro_lsh, not a classifier of its own: kept out of retrain_all and the demo.
register_network(NetworkSpec(
    name="magnifier", factory=magnifier, task="magnifier", model_class=MagnifierNet,
    profiles=_magnifier_profiles, data_format="magnified_pairs", dataset="magnified_pairs",
    primary_metric="gain_vs_linear", demo_size=64, default=False,
    description="learned motion magnifier pre-trained on (onset, apex, magnified) pairs; weights feed micro_lsh",
    reference="micro-expression recognition with magnification and LSH attention (magnifier pre-training)",
))
