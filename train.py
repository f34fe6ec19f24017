"""
autoresearch: pretrain a small GPT on one GPU for a fixed time budget, then report val_bpb.
This is the one file the agent edits: model, optimizer, hyperparameters and training loop.
prepare.py (data, tokenizer, loader, the metric) stays fixed.

Usage:
    uv run train.py                          # one experiment: TIME_BUDGET seconds of training
    AUTORESEARCH_SMOKE=1 uv run train.py     # tiny end-to-end check that also runs on a CPU
"""

import os
import sys

# prepare.py imports no torch, so it comes first: the compile caches and the allocator are set
# before torch is imported.
from prepare import MAX_SEQ_LEN, TIME_BUDGET, SMOKE, Tokenizer, make_dataloader, evaluate_bpb, set_compile_cache
set_compile_cache()  # next to the data: an experiment reuses the kernels the previous one compiled
os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

import gc
import math
import time
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags)
# ---------------------------------------------------------------------------

# Model architecture
DEPTH = 8                # number of transformer layers; the main size knob
ASPECT_RATIO = 64        # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128           # attention head dimension
WINDOW_PATTERN = "SSSL"  # per layer, repeating: S = sliding window of half the context, L = full context

# Optimization
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step (~524K)
DEVICE_BATCH_SIZE = 128   # sequences per forward/backward; gradient accumulation makes up the rest
EMBEDDING_LR = 0.6        # token and value embeddings (AdamW)
UNEMBEDDING_LR = 0.004    # lm_head (AdamW)
MATRIX_LR = 0.04          # all 2D matrices inside the transformer blocks (Muon)
SCALAR_LR = 0.5           # per-layer residual / x0 scalars (AdamW)
WEIGHT_DECAY = 0.2        # cautious weight decay for Muon, ramped down to 0 over the run
ADAM_BETAS = (0.8, 0.95)  # AdamW beta1, beta2
WARMUP_RATIO = 0.0        # fraction of the time budget spent warming the LR up
WARMDOWN_RATIO = 0.5      # fraction of the time budget spent decaying the LR at the end
FINAL_LR_FRAC = 0.0       # LR at the end of warmdown, as a fraction of the initial LR

COMPILE = True            # torch.compile the model and the optimizer updates

# --- Smoke profile (AUTORESEARCH_SMOKE=1) --------------------------------------------------
# A tiny model, so the whole script (same code path, start to finish) runs on a CPU in seconds.
# prepare.py shrinks its side too: MAX_SEQ_LEN 256, TIME_BUDGET 10 s, a 1024-token vocabulary.
# Its numbers only show that everything works; they say nothing about a real GPU run.
if SMOKE:
    DEPTH = 2
    ASPECT_RATIO = 64       # -> model_dim 128
    HEAD_DIM = 32           # -> 4 heads
    DEVICE_BATCH_SIZE = 8
    TOTAL_BATCH_SIZE = DEVICE_BATCH_SIZE * MAX_SEQ_LEN  # no gradient accumulation
    COMPILE = torch.cuda.is_available()  # compiling on a CPU takes longer than the whole run

# Low precision for matmuls, embeddings and Muon's orthogonalization: bf16 on a GPU. A CPU runs
# bf16 several times slower than fp32, so the smoke profile computes in fp32 there.
LOW_PRECISION = torch.bfloat16 if torch.cuda.is_available() else torch.float32

if not SMOKE and not torch.cuda.is_available():
    sys.exit("train.py: no CUDA GPU found. Experiments need one; "
             "AUTORESEARCH_SMOKE=1 runs a tiny smoke profile on the CPU instead.")

# bf16 dense tensor-core peak (FLOP/s) by GPU name, for MFU. First matching row wins.
GPU_PEAK_FLOPS = [
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989.5e12),    # SXM / HBM3
    (("GH200",), 989.5e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989.5e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("RTX 4090",), 165.2e12),
]

# ---------------------------------------------------------------------------
# Attention: the one place where the kernel is chosen
# ---------------------------------------------------------------------------
# Tensors are (B, H, T, D). Full-context layers use SDPA with is_causal (PyTorch's fused
# flash kernel). Sliding-window layers use FlexAttention with a block mask, which skips the
# blocks outside the window entirely. FlexAttention cannot backpropagate on a CPU, so there
# (smoke profile only) the window is a dense boolean mask given to SDPA instead.

def sliding_window(window):
    """mask_mod for FlexAttention: query q sees itself and the `window` keys before it
    (k <= q and q - k <= window), as the reference's flash-attention window (window, 0)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
    return mask_mod


def build_attn_mask(window, seq_len, device):
    """Built once per layer, before training. None means plain causal attention."""
    if window >= seq_len:
        return None
    if device.type == "cuda":
        return create_block_mask(sliding_window(window), None, None, seq_len, seq_len, device=device)
    return create_mask(sliding_window(window), None, None, seq_len, seq_len, device=device)  # [1, 1, T, T] bool


def attention(q, k, v, mask):
    """Causal self-attention; mask comes from build_attn_mask. Returns (B, H, T, D)."""
    gqa = q.size(1) != k.size(1)  # fewer key/value heads than query heads
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x):
    # RMSNorm without a learned gain
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); rotate the two halves of the head dimension as pairs
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # The value-embedding gate reads only the first few channels of the input: cheap.
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, attn_mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

        # Value residual (ResFormer): add the token's value embedding, with a per-head gate in (0, 2)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)

        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = attention(q, k, v, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, attn_mask):
        x = x + self.attn(norm(x), ve, cos_sin, attn_mask)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Per layer: x = resid_lambda * x + x0_lambda * x0, where x0 is the embedded input
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # Rotary tables and attention masks depend on the device: init_weights() builds them.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.attn_masks = None

    @torch.no_grad()
    def init_weights(self):
        """Initialize on the final device (the model is first built on the meta device)."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # Uniform with the std of 1/sqrt(n_embd); output projections start at zero so each
        # block begins as the identity.
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2*sigmoid(0) = 1: neutral
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        device = self.transformer.wte.weight.device
        head_dim = n_embd // self.config.n_head
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim, device=device)
        self.attn_masks = [build_attn_mask(w, self.config.sequence_len, device) for w in self.window_sizes]
        # Embedding tables are stored in bf16: they are large and only ever gathered from.
        self.transformer.wte.to(dtype=LOW_PRECISION)
        for ve in self.value_embeds.values():
            ve.to(dtype=LOW_PRECISION)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        cos, sin = freqs.cos().to(LOW_PRECISION), freqs.sin().to(LOW_PRECISION)
        return cos[None, :, None, :], sin[None, :, None, :]  # broadcast over (B, T, H, D/2)

    def _compute_window_sizes(self, config):
        """Attention window per layer from the pattern; the last layer always sees the full context."""
        pattern = config.window_pattern.upper()
        assert pattern and all(c in "SL" for c in pattern)
        window = {"L": config.sequence_len, "S": config.sequence_len // 2}
        sizes = [window[pattern[i % len(pattern)]] for i in range(config.n_layer)]
        sizes[-1] = config.sequence_len
        return sizes

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 per non-embedding parameter,
        plus attention scores and values, 12 * n_head * head_dim * (keys attended) per layer."""
        nparams = sum(p.numel() for p in self.parameters())
        nparams_exclude = (self.transformer.wte.weight.numel()
                           + sum(ve.weight.numel() for ve in self.value_embeds.values())
                           + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h = self.config.n_head
        q = self.config.n_embd // self.config.n_head
        t = self.config.sequence_len
        attn_flops = sum(12 * h * q * min(w, t) for w in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def num_scaling_params(self):
        counts = {
            "wte": sum(p.numel() for p in self.transformer.wte.parameters()),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": sum(p.numel() for p in self.lm_head.parameters()),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                        weight_decay=0.0, adam_betas=(0.8, 0.95), scalar_lr=0.5):
        model_dim = self.config.n_embd
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        value_embeds_params = list(self.value_embeds.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(list(self.parameters())) == (len(matrix_params) + len(embedding_params)
                                               + len(value_embeds_params) + len(lm_head_params) + 2)
        # AdamW LRs were tuned at model_dim 768; scale them by 1/sqrt(dim / 768)
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print(f"Scaling AdamW LRs by 1/sqrt({model_dim}/768) = {dmodel_lr_scale:.6f}")
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        param_groups = [
            dict(adamw, params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(adamw, params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=value_embeds_params, lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        # Muon updates all matrices of one shape together as a stacked batch
        for shape in sorted({p.shape for p in matrix_params}):
            param_groups.append(dict(
                kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=matrix_lr,
                momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay,
            ))
        optimizer = MuonAdamW(param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits [B, T, vocab] (float32) without targets; the cross-entropy loss with them."""
        B, T = idx.size()
        assert T == self.config.sequence_len, f"attention masks are built for T={self.config.sequence_len}, got {T}"
        cos_sin = self.cos[:, :T], self.sin[:, :T]

        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.attn_masks[i])
        x = norm(x)

        softcap = 15  # smoothly bound the logits to (-15, 15)
        logits = self.lm_head(x).float()
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction=reduction)

# ---------------------------------------------------------------------------
# Optimizer: Muon for the matrices inside the blocks, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express: per-iteration coefficients (a, b, c) of X <- aX + b(XX^T)X + c(XX^T)^2 X,
# which drive all singular values of X towards 1 in a few bf16 matmul iterations.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """One AdamW update in place. Hyperparameters are 0-D tensors so that changing them
    (LR schedule) does not trigger a recompile."""
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom * (-lr_t / bias1))


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim):
    """One Muon update in place for a stack of same-shape matrices [N, rows, cols]."""
    # Nesterov momentum
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Orthogonalize (Polar Express), iterating on the smaller Gram matrix
    X = g.to(LOW_PRECISION)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    g = X
    # NorMuon: normalize each row (or column) by a running second moment of its update,
    # then rescale so the update's overall norm is unchanged
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_dim_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # Cautious weight decay: decay only the entries the update moves towards zero as well
    lr = lr_t.to(g.dtype)
    wd = wd_t.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


if COMPILE:
    # One fused kernel per update instead of dozens of small ones
    adamw_step = torch.compile(adamw_step, dynamic=False, fullgraph=True)
    muon_step = torch.compile(muon_step, dynamic=False, fullgraph=True)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups of kind 'adamw' or 'muon' (see GPT.setup_optimizer). Single GPU only."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # Hyperparameters go to the (compiled) update functions as 0-D CPU tensors
        def scalar():
            return torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._adamw_step_t, self._adamw_lr_t, self._adamw_beta1_t = scalar(), scalar(), scalar()
        self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t = scalar(), scalar(), scalar()
        self._muon_momentum_t, self._muon_lr_t, self._muon_wd_t, self._muon_beta2_t = scalar(), scalar(), scalar(), scalar()

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            self._adamw_step_t.fill_(state["step"])
            self._adamw_lr_t.fill_(group["lr"])
            self._adamw_beta1_t.fill_(group["betas"][0])
            self._adamw_beta2_t.fill_(group["betas"][1])
            self._adamw_eps_t.fill_(group["eps"])
            self._adamw_wd_t.fill_(group["weight_decay"])
            adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                       self._adamw_step_t, self._adamw_lr_t, self._adamw_beta1_t,
                       self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t)

    def _step_muon(self, group):
        params = group["params"]
        if not params:
            return
        state = self.state[params[0]]  # one state for the whole stack
        shape, device, dtype = params[0].shape, params[0].device, params[0].dtype
        # Second moments are kept per row for tall matrices, per column for wide ones
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=dtype, device=device)
            second_shape = (len(params), shape[-2], 1) if red_dim == -1 else (len(params), 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(second_shape, dtype=dtype, device=device)
        stacked_grads = torch.stack([p.grad for p in params])
        stacked_params = torch.stack(params)
        self._muon_momentum_t.fill_(group["momentum"])
        self._muon_beta2_t.fill_(group["beta2"])
        self._muon_lr_t.fill_(group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5)  # taller: larger step
        self._muon_wd_t.fill_(group["weight_decay"])
        muon_step(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                  self._muon_momentum_t, self._muon_lr_t, self._muon_wd_t, self._muon_beta2_t,
                  group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            elif group["kind"] == "muon":
                self._step_muon(group)

# ---------------------------------------------------------------------------
# Schedules: all driven by progress = training seconds so far / TIME_BUDGET
# ---------------------------------------------------------------------------

def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO  # 1 -> 0 over the warmdown
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)  # 0.85 -> 0.95 over the first 300 steps
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def gpu_peak_flops(name):
    for keys, flops in GPU_PEAK_FLOPS:
        if all(k in name for k in keys):
            return flops
    return None

# ---------------------------------------------------------------------------
# Setup: tokenizer, model, optimizer, data
# ---------------------------------------------------------------------------

t_start = time.time()
torch.manual_seed(42)
torch.set_float32_matmul_precision("high")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
autocast_ctx = torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=LOW_PRECISION == torch.bfloat16)
if SMOKE:
    print(f"=== SMOKE profile on {device.type.upper()}: tiny model, {TIME_BUDGET}s budget; not a real result ===")

if device.type == "cuda":
    gpu_name = torch.cuda.get_device_name()
    peak_flops = gpu_peak_flops(gpu_name)
    if peak_flops is None:
        print(f"GPU {gpu_name!r} is not in GPU_PEAK_FLOPS: MFU is reported as 0")
else:
    gpu_name, peak_flops = "CPU", None
print(f"Device: {gpu_name}" + (f" (bf16 peak {peak_flops / 1e12:.1f} TFLOP/s)" if peak_flops else ""))

def sync():
    if device.type == "cuda":  # wait for the GPU so that step times are real
        torch.cuda.synchronize()

tokenizer = Tokenizer.from_directory()
vocab_size = tokenizer.get_vocab_size()
print(f"Vocab size: {vocab_size:,}")

model_dim = (DEPTH * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM * HEAD_DIM  # round up to whole heads
num_heads = model_dim // HEAD_DIM
config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH,
                   n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim,
                   window_pattern=WINDOW_PATTERN)
print(f"Model config: {asdict(config)}")

with torch.device("meta"):  # allocate nothing until the real device is known
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()

param_counts = model.num_scaling_params()
print("Parameter counts:")
for key, value in param_counts.items():
    print(f"  {key:24s}: {value:,}")
num_params = param_counts["total"]
num_flops_per_token = model.estimate_flops()
print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0
grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

optimizer = model.setup_optimizer(
    unembedding_lr=UNEMBEDDING_LR,
    embedding_lr=EMBEDDING_LR,
    scalar_lr=SCALAR_LR,
    adam_betas=ADAM_BETAS,
    matrix_lr=MATRIX_LR,
    weight_decay=WEIGHT_DECAY,
)
if COMPILE:
    model = torch.compile(model, dynamic=False)

train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
x, y, epoch = next(train_loader)  # prefetch the first batch

print(f"Time budget: {TIME_BUDGET}s")
print(f"Gradient accumulation steps: {grad_accum_steps}")

# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

warmup_steps = 10  # steps 0..10 compile and warm up: not counted against the budget
t_start_training = time.time()
smooth_train_loss = 0
total_training_time = 0
step = 0
while True:
    sync()
    t0 = time.time()
    for micro_step in range(grad_accum_steps):
        with autocast_ctx:
            loss = model(x, y)
        train_loss = loss.detach()
        (loss / grad_accum_steps).backward()
        x, y, epoch = next(train_loader)

    progress = min(total_training_time / TIME_BUDGET, 1.0)
    lrm = get_lr_multiplier(progress)
    muon_momentum = get_muon_momentum(step)
    muon_weight_decay = get_weight_decay(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum
            group["weight_decay"] = muon_weight_decay
    optimizer.step()
    model.zero_grad(set_to_none=True)

    train_loss_f = train_loss.item()
    if math.isnan(train_loss_f) or train_loss_f > 100:
        print(f"\nFAIL: training loss is {train_loss_f} at step {step} (NaN or > 100): the run diverged.")
        sys.exit(1)

    sync()
    dt = time.time() - t0
    if step > warmup_steps:
        total_training_time += dt

    ema_beta = 0.9
    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
    debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
    tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
    mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops if peak_flops else 0.0
    remaining = max(0, TIME_BUDGET - total_training_time)
    print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | "
          f"dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | epoch: {epoch} | "
          f"remaining: {remaining:.0f}s    ", end="", flush=True)

    # Python's garbage collector can stall for ~500 ms: collect once, then only rarely
    if step == 0:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif (step + 1) % 5000 == 0:
        gc.collect()

    step += 1
    if step > warmup_steps and total_training_time >= TIME_BUDGET:
        break

print()  # end the \r progress line
total_tokens = step * TOTAL_BATCH_SIZE

# The model is scored outside this process: evaluate_bpb hands it over (torch.export of model(x),
# so the forward pass must be traceable; program.md, "What evaluation needs"). Under run.sh it
# returns nan and run.sh reports val_bpb; run by hand it returns the score.
model.eval()
with autocast_ctx:
    val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)

t_end = time.time()
counted_steps = step - warmup_steps
steady_state_mfu = (100 * num_flops_per_token * TOTAL_BATCH_SIZE * counted_steps / total_training_time / peak_flops
                    if peak_flops and total_training_time > 0 else 0.0)
peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if device.type == "cuda" else 0.0

print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {total_training_time:.1f}")
print(f"total_seconds:    {t_end - t_start:.1f}")
print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
print(f"mfu_percent:      {steady_state_mfu:.2f}")
print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {num_params / 1e6:.1f}")
print(f"depth:            {DEPTH}")
if SMOKE:
    print(f"profile:          SMOKE ({device.type.upper()}) - a tiny check, not a real result")

