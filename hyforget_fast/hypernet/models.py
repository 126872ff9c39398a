"""DiHyFo-1 and DiHyFo-2: G.pt-style Diffusion Transformers over parameter tokens (the dissertation's models).

Sequence (one row of the batch), in order:
  scalar tokens   t, then per class: target loss L*_c (both models), and for DiHyFo-1 also the
                  current loss L_c and the difference L*_c - L_c; each scalar x is encoded as
                  [sin(f x), cos(f x), x] with f = 2**linspace(0, 14, 128), then mapped to the
                  width by its own linear map
  param tokens    the noisy future parameters θ*_t (normalized, tokenized); for DiHyFo-1 each
                  position also adds the embedding of the same chunk of the current parameters
                  θ. (G.pt appends θ as a second run of tokens; adding it at the same position
                  carries the same information, aligned chunk to chunk, in half the sequence:
                  attention and MLP cost drop by about 2x.)
Every parameter-token position has its own input map (chunk -> width) and output map
(width -> chunk): stored as stacked weights (T, chunk, width) and applied as ONE einsum over
the padded token tensor, never a loop over tokens. Pre-LN GPT-2 blocks without a mask, a
learned positional embedding initialised to zero, and a zero-initialised decoder, so that at
initialisation DiHyFo-1 predicts θ* = θ (the global residual) and DiHyFo-2 predicts 0 (the
normalized mean).

The model predicts x0 (the clean normalized θ*); padding values of the last token of a piece
are forced to 0 by a (T, chunk) mask.

Token layout (`HypernetConfig.tokens`, ops/spec.py TokenLayout):
  "layer"   the G.pt layout above: chunks of each layer's weight / bias, every position with its
            own maps and positional embedding (the default; configs saved before the field load so).
  "neuron"  one token per hidden unit (its incoming weights, bias and outgoing weights: C = in +
            1 + out) and one output-bias token, for one-hidden-layer MLPs. Every hidden-unit token
            shares ONE input map, ONE output map and ONE type embedding (no per-position
            embedding among them), and attention has no mask, so nothing tells the units apart:
            permuting the hidden units of x_t (and of θ for DiHyFo-1) permutes the prediction
            exactly (DWSNets, Navon et al. 2023; Neural Graphs, Kofinas et al. 2024). The output-
            bias token has its own maps and embedding. DiHyFo-1 adds each unit's embedded θ token to
            the same unit's θ*_t token and predicts θ + delta, as in the layer-wise model. No
            canonical order or permutation augmentation is needed (train.py skips both).

Conditioning (`HypernetConfig.cond`, ablation in bench/RESULTS.md §4):
  "tokens"  the in-context scalar tokens above (G.pt; the default of configs saved before it existed).
  "adaln"   DiT's adaLN-Zero (Peebles & Xie 2023): the sequence holds only the parameter tokens;
            the conditioning vector c = MLP_t(enc(t)) + MLP_target(enc(target part))
            [+ MLP_cur(enc(L)) for DiHyFo-1] is computed once per sample and every block maps
            SiLU(c) to shift/scale/gate of its attention and MLP sub-blocks (LayerNorms without
            affine), the final LayerNorm to a shift/scale; every modulation map is zero-initialised,
            so at initialisation each block is the identity and the model still predicts θ / 0.
            The target part is L* (DiHyFo-1: L* and L* - L); classifier-free guidance's "no
            target" replaces that part's embedding by one learned vector.
Target representation (`target_repr`): "raw" feeds L* as is (frequencies up to 2^max_freq_log2);
"log" feeds z = (log(L* + LOG_EPS) - target_log_mean) / target_log_std, the statistics fitted on
the training checkpoints' class losses (pooled over classes) and stored in the config, at low
frequencies up to 2^target_max_freq_log2. DiHyFo-1's current losses L get the same transform and
its difference input becomes z* - z. The transform lives in the model: callers always pass raw losses.
Output parametrisation (`skip`): "none" returns the decoder's output as x0 (G.pt). "vp" (DiHyFo-2)
returns x0 = sqrt(ab_t) x_t + sqrt(1 - ab_t) F, the diffusion schedule's own skip connection
(EDM's c_skip / c_out for unit-variance data, Karras et al. 2022; equivalently v-prediction, Salimans
& Ho 2022). A linear decoder maps the width W to a token of C values, so without the skip every
predicted token lies in a W-dimensional affine subspace: a neuron token of MNIST's 784-7-10 has
C = 795 values against W = 128. The skip passes x_t through at full rank, which is what the
prediction needs at low noise; the decoder supplies the rest.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.spec import TOKEN_KINDS, MLPSpec, TokenLayout
from ..configs import strict_fields

KINDS = ("dihyfo1", "dihyfo2")
TOKENS = TOKEN_KINDS    # "layer" (G.pt chunks) or "neuron" (one token per hidden unit)
CONDS = ("tokens", "adaln")
TARGET_REPRS = ("raw", "log")
SKIPS = ("none", "vp")
LOG_EPS = 1e-3      # log(L + LOG_EPS): losses of well-trained classes go down to ~1e-4

# Presets: width, depth, heads, chunk. `tiny` trains on a 2-core CPU in minutes; `paper` is the
# dissertation's MNIST scale (chunk 1000 as G.pt's MNIST tokens). `tiny` conditions by adaLN-Zero
# on log targets over neuron tokens (one per hidden unit, exactly permutation-equivariant): 4-7x
# the layer-wise training steps per second, 7-11x faster sampling and better prompt alignment
# (bench/RESULTS.md §4); MLPs with more than one hidden layer fall back to layer-wise tokens.
# `paper` keeps the G.pt design until measured at that scale.
PRESETS = {
    "tiny": dict(width=128, depth=4, heads=4, chunk=64, cond_dropout=0.1, cond="adaln", target_repr="log",
                 tokens="neuron"),
    "paper": dict(width=1536, depth=12, heads=16, chunk=1000, cond_dropout=0.1),
}


@dataclass(frozen=True)
class HypernetConfig:
    """Everything that fixes a DiHyFo's architecture (JSON-able)."""

    kind: str
    layer_sizes: tuple[int, ...]
    width: int = 128
    depth: int = 4
    heads: int = 4
    chunk: int = 64
    num_freqs: int = 128
    max_freq_log2: float = 14.0
    mlp_ratio: float = 4.0
    cond_dropout: float = 0.0          # training: chance of replacing the target tokens by "no target"
    cond: str = "tokens"               # "tokens" (in-context scalars, G.pt) or "adaln" (DiT adaLN-Zero)
    target_repr: str = "raw"           # "raw" L* or "log": standardised log(L* + LOG_EPS)
    target_log_mean: float = 0.0       # "log": statistics of log(L + LOG_EPS) on the training data
    target_log_std: float = 1.0
    target_max_freq_log2: float = 3.0  # "log": encoding frequencies 2**linspace(0, this)
    tokens: str = "layer"              # "layer" (chunks of `chunk` values) or "neuron" (one token per hidden
                                       # unit; `chunk` unused); configs saved before the field: "layer"
    skip: str = "none"                 # x0 = decoder output ("none") or sqrt(ab) x_t + sqrt(1 - ab) output
                                       # ("vp", DiHyFo-2 only); configs saved before the field: "none"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, got {self.kind!r}")
        if self.cond not in CONDS:
            raise ValueError(f"cond must be one of {CONDS}, got {self.cond!r}")
        if self.tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {TOKENS}, got {self.tokens!r}")
        if self.skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {self.skip!r}")
        if self.skip != "none" and self.kind == "dihyfo1":
            raise ValueError("skip 'vp' is for DiHyFo-2: DiHyFo-1 already predicts theta + delta")
        if self.target_repr not in TARGET_REPRS:
            raise ValueError(f"target_repr must be one of {TARGET_REPRS}, got {self.target_repr!r}")
        if not (math.isfinite(self.target_log_mean) and math.isfinite(self.target_log_std) and self.target_log_std > 0):
            raise ValueError(f"target_log_mean must be finite and target_log_std finite and > 0, got "
                             f"{self.target_log_mean}, {self.target_log_std}")
        object.__setattr__(self, "layer_sizes", tuple(int(s) for s in self.layer_sizes))
        MLPSpec(self.layer_sizes)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if min(self.width, self.depth, self.heads, self.chunk, self.num_freqs) <= 0:
            raise ValueError("width, depth, heads, chunk and num_freqs must be positive")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        self.layout  # neuron tokens of a deeper MLP are refused here, naming the reason

    @property
    def spec(self) -> MLPSpec:
        return MLPSpec(self.layer_sizes)

    @property
    def num_classes(self) -> int:
        return self.layer_sizes[-1]

    @property
    def layout(self) -> TokenLayout:
        if self.tokens == "neuron":
            return TokenLayout(self.spec, kind="neuron")
        return TokenLayout(self.spec, self.chunk)

    def to_dict(self) -> dict:
        """JSON-able fields. `tokens` is written only when not "layer" and `skip` only when not
        "none": a config without them reads exactly as before the fields existed (shipped model
        cards, saved runs), and from_dict reads their absence as those defaults."""
        d = dataclasses.asdict(self)
        d["layer_sizes"] = list(self.layer_sizes)
        if d["tokens"] == "layer":
            del d["tokens"]
        if d["skip"] == "none":
            del d["skip"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HypernetConfig":
        return cls(**strict_fields(cls, d))

    @classmethod
    def preset(cls, kind: str, spec: MLPSpec, preset: str = "tiny", **overrides) -> "HypernetConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown hypernetwork preset {preset!r}; choose from {sorted(PRESETS)}")
        kw = {**PRESETS[preset], **overrides}
        if kw.get("tokens") == "neuron" and len(spec.hidden_sizes) > 1 and "tokens" not in overrides:
            kw["tokens"] = "layer"        # neuron tokens need one hidden layer (ops.spec.TokenLayout)
        return cls(kind=kind, layer_sizes=tuple(spec.layer_sizes), **kw)


class FrequencyEncoder(nn.Module):
    """Scalars (B, S) -> (B, S, 2F+1) features [sin(f x), cos(f x), x], f = 2**linspace(0, max, F)."""

    def __init__(self, num_freqs: int, max_freq_log2: float):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.linspace(0.0, max_freq_log2, num_freqs), persistent=False)

    @property
    def dim(self) -> int:
        return 2 * self.freqs.numel() + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()[..., None] * self.freqs                               # (B, S, F)
        return torch.cat([xf.sin(), xf.cos(), x.float()[..., None]], -1)     # (B, S, 2F+1)


class TokenLinear(nn.Module):
    """A separate linear map per token position: (B, T, i) -> (B, T, o), one einsum."""

    def __init__(self, tokens: int, d_in: int, d_out: int, zero: bool = False):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        w = torch.zeros(tokens, d_in, d_out) if zero else torch.empty(tokens, d_in, d_out).uniform_(-bound, bound)
        self.weight = nn.Parameter(w)                                        # (T, i, o)
        self.bias = nn.Parameter(torch.zeros(tokens, d_out))                 # (T, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bti,tio->bto", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)


class UnitLinear(nn.Module):
    """Neuron tokens' maps: ONE linear map shared by the hidden-unit tokens 0..T-2, and one of its
    own for the output-bias token T-1: (B, T, i) -> (B, T, o). Sharing is what makes the model
    permutation-equivariant: a unit's token is mapped the same way wherever it sits."""

    def __init__(self, d_in: int, d_out: int, zero: bool = False):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)

        def w():
            return torch.zeros(d_in, d_out) if zero else torch.empty(d_in, d_out).uniform_(-bound, bound)
        self.weight = nn.Parameter(w())                                      # (i, o) hidden-unit tokens
        self.bias = nn.Parameter(torch.zeros(d_out))                         # (o,)
        self.last_weight = nn.Parameter(w())                                 # (i, o) output-bias token
        self.last_bias = nn.Parameter(torch.zeros(d_out))                    # (o,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units = x[:, :-1] @ self.weight.to(x.dtype) + self.bias.to(x.dtype)          # (B, T-1, o)
        last = x[:, -1:] @ self.last_weight.to(x.dtype) + self.last_bias.to(x.dtype)  # (B, 1, o)
        return torch.cat([units, last], 1)


class Block(nn.Module):
    """GPT-2 style pre-LN transformer block, no causal mask, attention by SDPA."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, D // self.heads)   # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                     # 3 x (B, H, N, Dh)
        a = F.scaled_dot_product_attention(q, k, v)                              # (B, H, N, Dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))                    # (B, N, D)
        return x + self.mlp(self.ln2(x))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]                         # (B, N, D), (B, D)


class AdaLNBlock(Block):
    """DiT adaLN-Zero block: the Block's attention and MLP, LayerNorms without affine, and
    shift / scale / gate of both sub-blocks from SiLU(c) by one zero-initialised linear map."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__(width, heads, mlp_ratio)
        self.ln1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ln2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=1)       # 6 x (B, D)
        qkv = self.qkv(_modulate(self.ln1(x), sh1, sc1)).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)                              # (B, H, N, Dh)
        x = x + g1[:, None] * self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + g2[:, None] * self.mlp(_modulate(self.ln2(x), sh2, sc2))


def _embed_mlp(d_in: int, width: int) -> nn.Sequential:
    """DiT's timestep embedder shape: features -> width -> SiLU -> width."""
    return nn.Sequential(nn.Linear(d_in, width), nn.SiLU(), nn.Linear(width, width))


class DiHyFo(nn.Module):
    """DiHyFo-1 (kind "dihyfo1") or DiHyFo-2 (kind "dihyfo2"); predicts clean normalized tokens.

    forward(x_t (B, T, C), t (B,), target_loss (B, m), theta (B, T, C) = None, loss (B, m) = None,
    drop_target (B,) bool = None) -> x0 prediction (B, T, C) float32. T = layout.num_tokens,
    C = layout.token_width (chunk, or in + 1 + out for neuron tokens). DiHyFo-1 needs theta and
    loss (the current parameters and their per-class losses) and returns theta + delta. Rows with
    drop_target True see "no target" (guidance's unconditional branch; trained with probability
    cfg.cond_dropout). With neuron tokens, permuting tokens 0..T-2 of x_t (and theta) permutes
    the output the same way.
    """

    def __init__(self, cfg: HypernetConfig, num_diffusion_steps: int = 1000):
        super().__init__()
        self.cfg = cfg
        self.layout = cfg.layout
        T, C, W, m = self.layout.num_tokens, self.layout.token_width, cfg.width, cfg.num_classes
        self.neuron = self.layout.kind == "neuron"
        self.num_steps = int(num_diffusion_steps)
        self.conditional_on_theta = cfg.kind == "dihyfo1"
        self.adaln = cfg.cond == "adaln"
        self.num_scalars = 1 + (3 * m if self.conditional_on_theta else m)
        self.encoder = FrequencyEncoder(cfg.num_freqs, cfg.max_freq_log2)
        # loss scalars: the same encoder ("raw") or a low-frequency one ("log")
        self.loss_encoder = self.encoder if cfg.target_repr == "raw" else \
            FrequencyEncoder(cfg.num_freqs, cfg.target_max_freq_log2)
        n_target = 2 * m if self.conditional_on_theta else m                # L* (and L* - L)
        if self.adaln:
            self.scalar_in = None
            self.t_embed = _embed_mlp(self.encoder.dim, W)
            self.target_embed = _embed_mlp(n_target * self.loss_encoder.dim, W)
            self.cur_embed = _embed_mlp(m * self.loss_encoder.dim, W) if self.conditional_on_theta else None
            self.target_slots = []
            self.null_target = nn.Parameter(torch.zeros(1, W))              # CFG: "no target" embedding
            n_seq = T
        else:
            self.scalar_in = TokenLinear(self.num_scalars, self.encoder.dim, W)
            # Classifier-free guidance (Ho & Salimans 2022): "no target" embeddings that replace the
            # target-loss tokens (and, for DiHyFo-1, the loss-difference tokens) when dropped.
            self.target_slots = list(range(1, 1 + m)) + (list(range(1 + 2 * m, 1 + 3 * m)) if self.conditional_on_theta else [])
            self.null_target = nn.Parameter(torch.zeros(len(self.target_slots), W))
            n_seq = self.num_scalars + T
        per_token = UnitLinear if self.neuron else (lambda i, o, zero=False: TokenLinear(T, i, o, zero))
        self.x_in = per_token(C, W)
        self.theta_in = per_token(C, W) if self.conditional_on_theta else None
        self.n_seq = n_seq
        # learned, zero-initialised; neuron tokens: the scalar positions, then ONE embedding shared
        # by all hidden-unit tokens and one for the output-bias token (expanded by _pos)
        self.pos = nn.Parameter(torch.zeros(1, n_seq - T + 2 if self.neuron else n_seq, W))
        blk = AdaLNBlock if self.adaln else Block
        self.blocks = nn.ModuleList([blk(W, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        if self.adaln:
            self.ln_f = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
            self.ada_f = nn.Linear(W, 2 * W)                                # final shift / scale, zero-init
            nn.init.zeros_(self.ada_f.weight)
            nn.init.zeros_(self.ada_f.bias)
        else:
            self.ln_f = nn.LayerNorm(W)
        self.out = per_token(W, C, zero=True)                               # zero-initialised decoder
        self.register_buffer("token_mask", self.layout.token_mask(), persistent=False)  # (T, C) 1 = real value
        if cfg.skip == "vp":   # the schedule's signal / noise scales, from the one definition of it
            from .diffusion import GaussianDiffusion
            sched = GaussianDiffusion(self.num_steps)
            self.register_buffer("skip_x", sched.sqrt_ab.clone(), persistent=False)     # (num_steps,)
            self.register_buffer("skip_out", sched.sqrt_1mab.clone(), persistent=False)  # (num_steps,)

    def _pos(self) -> torch.Tensor:
        """(1, N, W) embedding of every sequence position (neuron tokens: the unit type repeated)."""
        if not self.neuron:
            return self.pos
        S, h = self.n_seq - self.layout.num_tokens, self.layout.num_unit_tokens
        return torch.cat([self.pos[:, :S], self.pos[:, S:S + 1].expand(-1, h, -1), self.pos[:, S + 1:]], 1)

    def _check(self, x_t, t, target_loss, theta, loss):
        T, C, m = self.layout.num_tokens, self.layout.token_width, self.cfg.num_classes
        if x_t.ndim != 3 or x_t.shape[1:] != (T, C):
            raise ValueError(f"x_t must be (B, {T}, {C}) tokens, got {tuple(x_t.shape)}")
        B = x_t.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must be (B,) = ({B},), got {tuple(t.shape)}")
        if target_loss.shape != (B, m):
            raise ValueError(f"target losses must be (B, m) = ({B}, {m}), got {tuple(target_loss.shape)}")
        if self.conditional_on_theta:
            if theta is None or loss is None:
                raise ValueError("DiHyFo-1 needs the current parameters theta and their per-class losses")
            if theta.shape != x_t.shape or loss.shape != (B, m):
                raise ValueError(f"theta must be {tuple(x_t.shape)} and loss ({B}, {m}); got "
                                 f"{tuple(theta.shape)} and {tuple(loss.shape)}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, target_loss: torch.Tensor,
                theta: torch.Tensor | None = None, loss: torch.Tensor | None = None,
                drop_target: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x_t, t, target_loss, theta, loss)
        if self.adaln:
            return self._forward_adaln(x_t, t, target_loss, theta, loss, drop_target)
        target_loss, loss = self.loss_repr(target_loss), self.loss_repr(loss)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=x_t.is_cuda):
            if self.cfg.target_repr == "raw":
                scal = [t.float()[:, None] / self.num_steps, target_loss]
                if self.conditional_on_theta:
                    scal += [loss, target_loss - loss]
                s = self.scalar_in(self.encoder(torch.cat(scal, 1)))        # (B, S, W)
            else:                                                           # low frequencies for losses
                ls = [target_loss] + ([loss, target_loss - loss] if self.conditional_on_theta else [])
                feats = torch.cat([self.encoder(t.float()[:, None] / self.num_steps),
                                   self.loss_encoder(torch.cat(ls, 1))], 1)
                s = self.scalar_in(feats)                                   # (B, S, W)
            if drop_target is not None:
                slots = s[:, self.target_slots]                             # (B, n_target, W)
                null = self.null_target.to(s.dtype).expand_as(slots)
                s = s.index_copy(1, torch.tensor(self.target_slots, device=s.device),
                                 torch.where(drop_target[:, None, None], null, slots))
            p = self.x_in(x_t)                                              # (B, T, W)
            if self.conditional_on_theta:
                p = p + self.theta_in(theta)
            h = torch.cat([s, p], 1) + self._pos()                          # (B, S + T, W)
            for blk in self.blocks:
                h = blk(h)
            T = self.layout.num_tokens
            delta = self.out(self.ln_f(h[:, -T:])).float()                  # (B, T, C) param positions
        return self._x0(x_t, t, delta, theta)

    def _x0(self, x_t, t, delta, theta) -> torch.Tensor:
        """The decoder's output (B, T, C) -> the x0 prediction: theta + delta (DiHyFo-1), delta
        (DiHyFo-2) or, with skip "vp", sqrt(ab_t) x_t + sqrt(1 - ab_t) delta; padding is 0."""
        delta = delta * self.token_mask
        if self.conditional_on_theta:
            return theta.float() * self.token_mask + delta
        if self.cfg.skip == "vp":
            a, b = self.skip_x[t].view(-1, 1, 1), self.skip_out[t].view(-1, 1, 1)     # (B, 1, 1)
            return a * x_t.float() * self.token_mask + b * delta
        return delta

    def loss_repr(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Raw per-class losses -> the model's representation of them (cfg.target_repr)."""
        if x is None or self.cfg.target_repr == "raw":
            return x
        return ((x.float().clamp(min=0) + LOG_EPS).log() - self.cfg.target_log_mean) / self.cfg.target_log_std

    def cond_embedding(self, t: torch.Tensor, target_loss: torch.Tensor, loss: torch.Tensor | None = None,
                       drop_target: torch.Tensor | None = None) -> torch.Tensor:
        """adaLN conditioning vector c (B, W): t, target part and (DiHyFo-1) current-loss part."""
        B = t.shape[0]
        z_t, z = self.loss_repr(target_loss), self.loss_repr(loss)
        c = self.t_embed(self.encoder(t.float()[:, None] / self.num_steps).flatten(1))
        tgt = [z_t] + ([z_t - z] if self.conditional_on_theta else [])
        e = self.target_embed(self.loss_encoder(torch.cat(tgt, 1)).flatten(1))  # (B, W)
        if drop_target is not None:
            e = torch.where(drop_target[:, None], self.null_target.to(e.dtype).expand(B, -1), e)
        c = c + e
        if self.conditional_on_theta:
            c = c + self.cur_embed(self.loss_encoder(z).flatten(1))
        return c

    def _forward_adaln(self, x_t, t, target_loss, theta, loss, drop_target) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=x_t.is_cuda):
            c = self.cond_embedding(t, target_loss, loss, drop_target)     # (B, W)
            h = self.x_in(x_t)                                              # (B, T, W)
            if self.conditional_on_theta:
                h = h + self.theta_in(theta)
            h = h + self._pos()
            for blk in self.blocks:
                h = blk(h, c)
            shift, scale = self.ada_f(F.silu(c)).chunk(2, dim=1)
            delta = self.out(_modulate(self.ln_f(h), shift, scale)).float()  # (B, T, C)
        return self._x0(x_t, t, delta, theta)

    def num_flops_per_sample(self) -> int:
        """Model FLOPs of one forward (matmuls only, 2 per multiply-add), for MFU reporting."""
        W, T, C = self.cfg.width, self.layout.num_tokens, self.layout.token_width
        N = self.n_seq
        hidden = int(W * self.cfg.mlp_ratio)
        per_block = 2 * N * (3 * W * W + W * W + 2 * W * hidden) + 2 * 2 * N * N * W
        io = 2 * (self.num_scalars * self.encoder.dim * W + T * C * W * (2 if self.conditional_on_theta else 1)
                  + T * W * C)
        if self.adaln:   # per-sample modulation maps and embedding MLPs (no per-token cost)
            per_block += 2 * W * 6 * W
            io += 2 * (2 * W * W + self.num_scalars * self.loss_encoder.dim * W + 3 * W * W)
        return self.cfg.depth * per_block + io
