"""
The encoder: a small pre-LayerNorm transformer for masked language modelling, with N-hot
sub-token embeddings and a tied output head that is computed only where there is a target.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM Challenge 2025). The N-hot idea: a token's vector is its own
embedding plus the sum of the embeddings of its character sub-units, so spelling reaches the
model and rare words share what they have in common with frequent ones.

    from model import ModelConfig, MaskedLM, SIZES
    model = MaskedLM(ModelConfig(vocab_size=16384, **SIZES["tiny"]), nhot_table=table)
    logits, loss = model(input_ids, labels=labels)   # logits: (n_labelled, V)
    logits, _ = model(input_ids)                     # logits: (B, T, V)

This file is the plain model, library ops only, and it runs exactly what you read. lib/fast.py builds a faster
twin on it (FastMaskedLM: the same maths through hand-written pieces, the same state_dict); train.py and
evaluate.py use that one unless given --no-fast (or, in train.py, --compile, which compiles this one).

Positions are rotary (RoPE): the training recipe switches from 64- to 256-token sequences
mid-run, and a rotation that depends only on relative distance has no learned table whose
rows for positions 65..256 would still be untrained at the switch.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# configuration

@dataclass
class ModelConfig:
    vocab_size: int = 16384
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    max_len: int = 256      # longest training sequence (RoPE itself works at any length)
    dropout: float = 0.1
    nhot: bool = False      # N-hot sub-token embedding sum on/off
    n_units: int = 0        # rows of the sub-token embedding table
    max_units: int = 0      # columns of the padded (vocab, max_units) N-hot table

SIZES = {  # shapes for train.py --size
    "tiny":  dict(n_layer=4,  n_head=4,  d_model=256, d_ff=1024),   # CPU smoke tests and experiments
    "small": dict(n_layer=6,  n_head=6,  d_model=384, d_ff=1536),
    "paper": dict(n_layer=12, n_head=12, d_model=384, d_ff=1280),   # the paper's shape (with a 40k vocab)
}

# -----------------------------------------------------------------------------
# rotary position embedding

def rope_tables(T, head_dim, device, base=10000.0):
    """cos and sin tables of shape (T, head_dim/2) for rotary position embedding.
    Example: T=2, head_dim=2 -> cos [[1.], [0.5403]], sin [[0.], [0.8415]] (angles 0 and 1 rad)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate the pairs (x1[i], x2[i]) of the two halves of each head's channels by the angle of the
    position and the pair; x: (B, nh, T, hd). Example: hd=2, angle pi/2: [1, 0] -> [0, 1]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 under autocast
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

# -----------------------------------------------------------------------------
# attention and the transformer block

def attention(q, k, v, key_mask=None, scale=None):
    """softmax(q k^T / sqrt(hd)) v over all positions (bidirectional); q, k, v: (B, nh, T, hd), key_mask
    (B, 1, 1, T) True = may be attended. No dropout on the attention probabilities: residual dropout suffices.
    Example: one query, keys k1 = k2, values [1] and [3] -> [2] (equal scores, equal weights)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cuda":  # the fused kernel: the same maths without a (T, T) matrix in memory
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=scale)
    a = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    if key_mask is not None:
        a = a.masked_fill(~key_mask, float("-inf"))
    return a.softmax(dim=-1) @ v  # (B, nh, T, hd)

class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)). Bias-free linears (fewer, faster ops)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.p = cfg.n_head, cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # one matmul for q, k and v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def attn(self, x, cos, sin, key_mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        y = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, key_mask)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def mlp(self, x):
        return self.out(F.gelu(self.fc(x)))

    def forward(self, x, cos, sin, key_mask=None):
        """x (B, T, C) -> (B, T, C)."""
        x = x + F.dropout(self.attn(self.ln1(x), cos, sin, key_mask), self.p, self.training)
        x = x + F.dropout(self.mlp(self.ln2(x)), self.p, self.training)
        return x

# -----------------------------------------------------------------------------
# the masked language model

class MaskedLM(nn.Module):
    """Encoder + tied MLM head. With N-hot on, the (vocab, d_model) embedding matrix is composed as

        E = E_tok + N . E_sub          N: (vocab, n_units) N-hot matrix, row i = the units of token i

    Example: "▁walked" has units {"<w", "wa", "al", ..., "ed>", "w", "a", ...}; its vector is
    E_tok["▁walked"] + (E_sub["<w"] + E_sub["ed>"] + ...) / sqrt(n_units_of_token). The sum is
    divided by sqrt(k) for a token with k units: k independent vectors of norm r add up to norm
    about r*sqrt(k), so the scaled sum keeps the size of one embedding whatever the word's length.
    E serves as input lookup and, tied, as the output projection: "▁walked"'s score shares "ed>".
    """

    def __init__(self, config, nhot_table=None):
        super().__init__()
        cfg = self.config = config
        if nhot_table is not None:  # the table decides the N-hot shape; a loaded checkpoint brings its own
            cfg.nhot, cfg.max_units = True, nhot_table.shape[1]
            cfg.n_units = max(cfg.n_units, int(nhot_table.max()) + 1)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # lets the head learn token frequency cheaply
        if cfg.nhot:
            self.sub = nn.Embedding(cfg.n_units, cfg.d_model)
            # the padded (V, max_units) table as unit ids and weights 1/sqrt(k); pads: unit 0 with weight 0
            table = nhot_table if nhot_table is not None else torch.full((cfg.vocab_size, cfg.max_units), -1)
            self.register_buffer("nhot_ids", table.clamp(min=0).long())
            present = (table >= 0).float()
            self.register_buffer("nhot_w", present / present.sum(1, keepdim=True).clamp(min=1).sqrt())
        # init: N(0, 0.02) everywhere (BERT/GPT-2); the two residual projections of each block are
        # shrunk by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)
        for blk in self.blocks:
            for lin in (blk.proj, blk.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self._rope = (0, None, None)  # cache: (T, cos, sin)

    def num_params(self, embeddings=True):
        """Parameter count; embeddings=False leaves out the token and sub-token tables (and the output bias)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok.weight.numel() + self.out_bias.numel() + (self.sub.weight.numel() if self.config.nhot else 0)
        return n

    def embedding_matrix(self):
        """The composed (vocab, d_model) matrix E = E_tok + N . E_sub, built once per forward pass.
        Example: token 7 with units [3, 9] (weights 1/sqrt(2)): E[7] = E_tok[7] + (E_sub[3] + E_sub[9]) / sqrt(2)."""
        if not self.config.nhot:
            return self.tok.weight
        nsum = F.embedding_bag(self.nhot_ids, self.sub.weight, per_sample_weights=self.nhot_w, mode="sum")  # (V, C)
        return self.tok.weight + nsum

    def rope(self, T, device):
        if self._rope[0] < T or self._rope[1].device != device:
            with torch.inference_mode(False):  # a cache first built while evaluating must still serve training
                self._rope = (T, *rope_tables(T, self.config.d_model // self.config.n_head, device))
        return self._rope[1][:T], self._rope[2][:T]

    def encode(self, input_ids, attention_mask=None):
        """input_ids (B, T) -> (h, E): the encoder's output after the final LayerNorm, (B, T, C), and the
        embedding matrix it used, (V, C), which the tied head reuses. attention_mask (B, T): 1 = token, 0 = padding.
        Example: encode([[1, 7, 2]]) -> h of shape (1, 3, d_model), E of shape (vocab, d_model)."""
        E = self.embedding_matrix()
        x = F.dropout(F.embedding(input_ids, E), self.config.dropout, self.training)  # (B, T, C)
        cos, sin = self.rope(input_ids.shape[1], input_ids.device)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for blk in self.blocks:
            x = blk(x, cos, sin, key_mask)
        return self.ln_f(x), E

    def forward(self, input_ids, labels=None, attention_mask=None):
        """input_ids (B, T) -> (logits, loss).
        With labels (B, T) (-100 = no target): logits (n_labelled, V) only at the targets, loss = mean CE.
        Without labels: logits (B, T, V), loss None. attention_mask (B, T): 1 = token, 0 = padding.
        Example: labels [[-100, 7, -100]] -> logits (1, V) for position 1, loss = -log softmax(logits)[7]."""
        h, E = self.encode(input_ids, attention_mask)
        if labels is None:
            return F.linear(h, E, self.out_bias), None  # (B, T, V)
        # only the positions with a target (15-40 %) reach the loss: the head runs on those rows alone
        targets = labels != -100
        logits = F.linear(h[targets], E, self.out_bias)  # (n_labelled, V)
        # the mean over the targets; a batch without any gives 0, not the nan of a mean over nothing
        loss = F.cross_entropy(logits.float(), labels[targets], reduction="sum") / targets.sum().clamp(min=1)
        return logits, loss
