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
    """Rotate the two halves of each head's channels by position-dependent angles; x: (B, nh, T, hd).
    The plain definition, for reading and for the tests; the model runs RotaryQKV, the same maths fused
    with splitting q, k, v out of one projection."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 under autocast; sdpa wants one dtype
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

# -----------------------------------------------------------------------------
# hand-written pieces for CPU speed: each replaces a few library ops whose memory traffic, not arithmetic,
# dominated a training step here; each has a test that compares it with the plain version

class RotaryQKV(torch.autograd.Function):
    """The fused qkv projection (B, T, 3*nh, hd) -> q, k, v, each (B, nh, T, hd) and contiguous, with
    apply_rope on q and k and the 1/sqrt(hd) attention scale folded into q's tables (a free multiply).
    Same maths as slicing + apply_rope + transpose, with a hand-written backward: autograd through
    those slices zero-fills and copies whole gradient buffers, ~8 % of a CPU training step here."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, scale):
        B, T, nh3, hd = qkv.shape
        nh, h = nh3 // 3, hd // 2
        cos = torch.cat((cos, cos), dim=-1)  # (T, hd): both halves get the same cos
        tables = ((cos * scale, sin * scale), (cos, sin))  # q's tables carry the attention scale
        x = qkv.transpose(1, 2)  # (B, 3nh, T, hd), a strided view
        out = qkv.new_empty(3, B, nh, T, hd)  # q = out[0], k = out[1], v = out[2]
        for i, (c, s) in enumerate(tables):
            xi = x[:, i * nh:(i + 1) * nh]
            o = torch.mul(xi, c, out=out[i])  # full-width ops are the cheap ones: one here, two on halves
            o[..., :h].addcmul_(xi[..., h:], s, value=-1)  # x1 cos - x2 sin
            o[..., h:].addcmul_(xi[..., :h], s)             # x2 cos + x1 sin
        out[2] = x[:, 2 * nh:]
        ctx.save_for_backward(*tables[0], *tables[1])
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cq, sq, ck, sk = ctx.saved_tensors
        gq, gk, gv = gq.contiguous(), gk.contiguous(), gv.contiguous()  # gk comes transposed from q @ k^T
        B, nh, T, hd = gq.shape
        h = hd // 2
        grad = gq.new_empty(B, T, 3 * nh, hd)
        gx = grad.transpose(1, 2)  # (B, 3nh, T, hd); every element is written exactly once below
        for i, (g, c, s) in enumerate(((gq, cq, sq), (gk, ck, sk))):
            d = torch.mul(g, c, out=gx[:, i * nh:(i + 1) * nh])  # the rotation's transpose: by -angle
            d[..., :h].addcmul_(g[..., h:], s)
            d[..., h:].addcmul_(g[..., :h], s, value=-1)
        gx[:, 2 * nh:] = gv
        return grad, None, None, None

def dropout_mask(x, p):
    """A random mask shaped like x, in x's dtype: 0 with probability p, else 1/(1-p) (what F.dropout
    multiplies by). A cheaper stand-in on CPU for bernoulli_, which costs ~5 ms per (32, 128, 256)
    tensor here (more than all the layer norms and softmaxes of a step together). Each int64 draw gives
    four uniform 16-bit numbers, and an element is dropped when its number is among the lowest p * 2^16
    (p is rounded to a multiple of 1/65536).
    Example: p=0.1 -> keep u >= 6554 - 32768, with probability 58982/65536 = 0.89999, as 1/0.9 = 1.111."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # 64 uniform bits per draw
    u = bits.view(torch.int16)[:n].view(x.shape)  # four int16 per draw, each uniform on [-32768, 32767]
    keep = torch.ge(u, round(p * 65536) - 32768, out=torch.empty_like(x))  # 1.0 or 0.0, straight in x's dtype
    return keep.mul_(1 / (1 - p))  # (half the time of torch.where(u >= ..., 1 / (1 - p), 0.0) here)

def own_dropout(x, p, training):
    """Whether dropout runs on dropout_mask here: only where it pays, training on CPU with p > 0."""
    return training and p > 0 and x.device.type == "cpu"

def dropout(x, p, training):
    """F.dropout: zero each element with probability p and scale the rest by 1/(1-p)."""
    if not own_dropout(x, p, training):
        return F.dropout(x, p, training)
    return x * dropout_mask(x, p)

class DropoutAdd(torch.autograd.Function):
    """x + y * m for a saved 0-or-1/(1-p) mask m: one pass forward and one backward (autograd's own
    addcmul backward converts and rescales the mask again on every call)."""

    @staticmethod
    def forward(ctx, x, y, m):
        ctx.save_for_backward(m)
        return torch.addcmul(x, y, m)

    @staticmethod
    def backward(ctx, g):
        m, = ctx.saved_tensors
        return g, g * m, None

def dropout_add(x, y, p, training):
    """x + dropout(y), the residual update."""
    if not own_dropout(x, p, training):
        return x + F.dropout(y, p, training)
    return DropoutAdd.apply(x, y, dropout_mask(y, p))

class LinearCrossEntropy(torch.autograd.Function):
    """The tied head and its loss in one op: logits = h E^T + b and F.cross_entropy(logits.float(), targets),
    the mean over targets != -100; returns (logits, loss). Same maths as F.linear + F.cross_entropy, but the
    backward never builds the (n, V) gradient d loss / d logits = (softmax - onehot) * w. It walks the
    vocabulary in slices of 2048 columns and feeds each softmax slice, while it is in cache, to the three
    products that need it (dh, dE, db); the one-hot part touches only the target rows. A fresh (n, V)
    float tensor (42 MB for 640 x 16384) is served by mmap and page-faulted on first touch, ~10 ms here:
    the library pair allocates four per step (the logits, the log-probabilities, two gradients), this one
    allocates only the logits it returns.
    Example: h [[1, 0]], E [[0, 0], [ln 3, 0]], b 0, target [1] -> logits [[0, ln 3]], loss ln(4/3) = 0.2877,
    d loss / d logits [[0.25, -0.25]], so dh = [[-0.25 ln 3, 0]], dE = [[0.25, 0], [-0.25, 0]], db = [0.25, -0.25]."""
    cols = 2048  # vocabulary slice of the backward: (n, 2048) fp32 is 5 MB for n = 640

    @staticmethod
    def forward(ctx, h, E, b, targets):
        if torch.is_autocast_enabled(h.device.type):  # a custom op is not cast by autocast: do what F.linear would
            dt = torch.get_autocast_dtype(h.device.type)
            h, E, b = h.to(dt), E.to(dt), b.to(dt)
        n, V = h.shape[0], E.shape[0]
        logits = h @ E.t()  # (n, V)
        f32 = torch.promote_types(logits.dtype, torch.float32)  # bf16 logits are reduced in fp32
        lse = logits.new_empty(n, dtype=f32)  # log-sum-exp per row: all the backward needs of the softmax
        rows = max(1, 2**19 // V)  # rows per slice: 2 MB of fp32, in one core's L2 cache
        for i in range(0, n, rows):
            z = logits[i:i + rows]
            z += b  # the bias, added while the slice is in cache anyway
            lse[i:i + rows] = z.to(f32).logsumexp(dim=-1)
        keep = targets != -100
        t = targets.clamp(min=0)[:, None]  # (n, 1): ignored rows pick column 0, then get weight 0
        count = keep.sum().clamp(min=1)
        loss = ((lse - logits.gather(1, t).squeeze(1).to(f32)) * keep).sum() / count
        ctx.save_for_backward(h, E, logits, lse, t, keep, count)
        ctx.set_materialize_grads(False)  # nobody differentiates the logits: no (n, V) zero gradient for them
        return logits, loss

    @staticmethod
    def backward(ctx, g_logits, g_loss):
        h, E, logits, lse, t, keep, count = ctx.saved_tensors
        V, cols = E.shape[0], LinearCrossEntropy.cols
        dh = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)  # summed over slices, in fp32
        dE, db = torch.empty_like(E), lse.new_empty(V)
        g_loss = g_loss if g_loss is not None else lse.new_zeros(())
        w = keep[:, None] * (g_loss / count)  # (n, 1): each row's share of the mean, 0 for ignored rows
        buf = lse.new_empty(len(lse), min(cols, V))  # one slice buffer, reused: no page faults
        for c in range(0, V, cols):  # the softmax part, softmax * w, slice by slice
            s = slice(c, c + cols)
            z = logits[:, s]
            g = torch.sub(z, lse[:, None], out=buf[:, :z.shape[1]]).exp_().mul_(w)  # (n, cols)
            if g_logits is not None:  # only if the caller differentiates the logits themselves
                g += g_logits[:, s]
            db[s] = g.sum(0)
            g = g.to(h.dtype)
            torch.mm(g.t(), h, out=dE[s])  # (cols, C)
            dh += g @ E[s]  # (n, C)
        # the one-hot part, -w at each row's target column: one row of E, h and b per target
        t = t[:, 0]
        dh -= w * E[t]
        dE.index_add_(0, t, (-w * h).to(dE.dtype))
        db.index_add_(0, t, -w[:, 0])
        return dh, dE, db, None

class NHotSum(torch.autograd.Function):
    """N . E_sub, the (V, C) matrix of each token's unit vectors summed with its 1/sqrt(k) weights: one embedding_bag
    over the flat table. Its gradient for E_sub, N^T . g, is the same kind of sum over the transposed table (for
    each unit, the tokens that contain it), so the backward is one more embedding_bag. The library's own backward
    sorts the ~100k unit ids and scatters, every step: forward + backward take 11 ms with it, 4.5 ms with this
    one (CPU here, 16384 tokens x 6 units).
    Example: token 0 has units {0, 1}, token 1 has {1}, weights 1: N = [[1, 1], [0, 1]], so for g = [[1], [2]]
    the gradient is N^T g = [[1], [3]]: unit 0 gets token 0's row, unit 1 the sum of both."""

    @staticmethod
    def forward(ctx, W, bag, bag_t):  # bag, bag_t: (ids, offsets, weights) of the table and of its transpose
        ctx.save_for_backward(*bag_t)
        ids, offsets, w = bag
        return F.embedding_bag(ids, W, offsets, per_sample_weights=w, mode="sum")

    @staticmethod
    def backward(ctx, g):
        ids, offsets, w = ctx.saved_tensors
        return F.embedding_bag(ids, g.contiguous(), offsets, per_sample_weights=w, mode="sum"), None, None

# -----------------------------------------------------------------------------
# transformer block

def attention(q, k, v, key_mask=None):
    """softmax(q k^T) v over all positions (bidirectional), q already scaled by 1/sqrt(hd); key_mask
    (B, 1, 1, T) True = attend. No dropout on the attention probabilities: residual dropout suffices
    and it keeps the fast kernels."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0)
    # on CPU, plain matmuls beat sdpa's flash kernel: fwd+bwd on (32, 4, 128, 64), one core of this machine,
    # 21 vs 26 ms in fp32 and 13 vs 47 ms in bf16 (the attention matrix is small at T <= 256)
    a = q @ k.transpose(-2, -1)  # (B, nh, T, T)
    if key_mask is not None:
        a = a.masked_fill(~key_mask, float("-inf"))
    return a.softmax(dim=-1) @ v  # (B, nh, T, hd)

class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)). Bias-free linears (fewer, faster ops)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # one fused matmul for q, k, v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.p = cfg.dropout

    def forward(self, x, cos, sin, attn_mask, rows=None):
        """x (B, T, C) -> (B, T, C); with rows = (b, t), index tensors of shape (n,), only those positions'
        outputs (n, C) (rows may repeat): every position still serves as a key and value, but the projection,
        residual dropouts and MLP after the attention are row by row, so in the last block the other rows would
        be work for nothing."""
        B, T, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3 * self.n_head, C // self.n_head)  # (B, T, 3nh, hd)
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)  # keep bf16 under autocast; sdpa wants one dtype
        q, k, v = RotaryQKV.apply(qkv, cos, sin, (C // self.n_head) ** -0.5)  # each (B, nh, T, hd)
        y = attention(q, k, v, attn_mask).transpose(1, 2)  # (B, T, nh, hd)
        if rows is not None:
            x, y = x[rows], y[rows]  # (n, C), (n, nh, hd)
        y = y.reshape(x.shape)  # (B, T, C) or (n, C)
        x = dropout_add(x, self.proj(y), self.p, self.training)
        return dropout_add(x, self.out(F.gelu(self.fc(self.ln2(x)), approximate="none")), self.p, self.training)

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
            # the padded table becomes (ids, weights) for one embedding_bag call; pads get weight 0
            table = nhot_table if nhot_table is not None else torch.full((cfg.vocab_size, cfg.max_units), -1)
            self.register_buffer("nhot_ids", table.clamp(min=0).long())
            present = (table >= 0).float()
            self.register_buffer("nhot_w", present / present.sum(1, keepdim=True).clamp(min=1).sqrt())
            self.flatten_nhot()
            self.register_load_state_dict_post_hook(lambda module, keys: module.flatten_nhot())
        # init: N(0, 0.02) everywhere (BERT/GPT-2); the two residual projections of each block are
        # shrunk by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth
        self.apply(self._init)
        for blk in self.blocks:
            for lin in (blk.proj, blk.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self._rope = (0, None, None)  # cache: (T, cos, sin)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self, embeddings=True):
        """Parameter count; embeddings=False leaves out the token and sub-token tables (and the output bias)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok.weight.numel() + self.out_bias.numel() + (self.sub.weight.numel() if self.config.nhot else 0)
        return n

    def flatten_nhot(self):
        """The padded (V, max_units) table without its pads, as embedding_bag takes it: every token's unit ids
        and 1/sqrt(k) weights in one flat row, plus where each token's units start (an average token has far
        fewer units than the longest one); and the same table transposed, each unit's tokens, for the backward.
        Derived from the saved buffers, so rebuilt after a state-dict load.
        Example: units [[3, 5, pad], [5, pad, pad]], 6 units -> ids [3, 5, 5], offsets [0, 2];
        transposed: tokens [0, 0, 1], offsets [0, 0, 0, 0, 1, 1] (unit 3: token 0; unit 5: tokens 0 and 1)."""
        present = self.nhot_w > 0
        ids, w, k = self.nhot_ids[present], self.nhot_w[present], present.sum(1)  # k: units per token
        token = torch.arange(len(k), device=ids.device).repeat_interleave(k)  # each entry's token
        by_unit = torch.argsort(ids, stable=True)
        starts = lambda counts: F.pad(counts.cumsum(0)[:-1], (1, 0))  # where each row's entries begin
        for name, t in (("flat_ids", ids), ("flat_w", w), ("offsets", starts(k)),
                        ("t_ids", token[by_unit]), ("t_w", w[by_unit]),
                        ("t_offsets", starts(torch.bincount(ids, minlength=self.config.n_units)))):
            self.register_buffer("nhot_" + name, t, persistent=False)

    def embedding_matrix(self):
        """The composed (vocab, d_model) matrix E = E_tok + N . E_sub, built once per forward pass."""
        if not self.config.nhot:
            return self.tok.weight
        nsum = NHotSum.apply(self.sub.weight, (self.nhot_flat_ids, self.nhot_offsets, self.nhot_flat_w),
                             (self.nhot_t_ids, self.nhot_t_offsets, self.nhot_t_w))  # (V, C)
        return self.tok.weight + nsum

    def rope(self, T, device):
        if self._rope[0] < T or self._rope[1].device != device:
            with torch.inference_mode(False):  # a cache first built while evaluating must still serve training
                self._rope = (T, *rope_tables(T, self.config.d_model // self.config.n_head, device))
        return self._rope[1][:T], self._rope[2][:T]

    def forward(self, input_ids, labels=None, attention_mask=None):
        """input_ids (B, T) -> (logits, loss).
        With labels (B, T) (-100 = no target): logits (n_labelled, V) only at the targets, loss = mean CE.
        Without labels: logits (B, T, V), loss None. attention_mask (B, T): 1 = token, 0 = padding."""
        B, T = input_ids.shape
        E = self.embedding_matrix()
        # sparse: the lookup's gradient is only the B*T looked-up rows, added straight into the head's dense (V, C)
        # gradient for E, instead of a zeroed (V, C) buffer plus one more (V, C) addition (torch.compile can't trace it)
        sparse = not torch.compiler.is_compiling()
        x = dropout(F.embedding(input_ids, E, sparse=sparse), self.config.dropout, self.training)  # (B, T, C)
        cos, sin = self.rope(T, input_ids.device)
        mask = None  # None keeps sdpa on its fastest kernel when nothing is padded
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): which keys may be attended
        rows = None
        if labels is not None:
            # only the positions with a target (15-40 %) reach the loss: the head, and the last block after its
            # attention, run on those rows alone. The same maths as the full path, ~10 % of a training step saved
            # (in training, the last block's dropout masks are drawn for these rows only)
            b, t = (labels != -100).nonzero(as_tuple=True)  # (n,) each: where the targets are
            n = len(b)
            # round the row count up to a multiple of 128: a handful of distinct (n, V) shapes instead of one per
            # step keeps the allocator reusing its blocks (otherwise a CPU process grows ~1 GB per 100 steps)
            i = F.pad(torch.arange(n, device=b.device), (0, -n % 128))  # the pad rows repeat the first target ...
            rows = b[i], t[i]
            y = labels[rows]
            y[n:] = -100  # ... with no target, so they add nothing to the loss or the gradients
        for blk in self.blocks[:-1]:
            x = blk(x, cos, sin, mask)
        x = self.blocks[-1](x, cos, sin, mask, rows)  # (B, T, C), or (n rounded up, C) with labels
        if labels is None:
            return F.linear(self.ln_f(x), E, self.out_bias), None  # (B, T, V)
        logits, loss = LinearCrossEntropy.apply(self.ln_f(x), E, self.out_bias, y)  # (n rounded up, V), mean CE
        return logits[:n], loss  # (n_labelled, V)
