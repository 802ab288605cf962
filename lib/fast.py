"""
The same model, faster: FastMaskedLM is model.MaskedLM with its forward pass and N-hot sum run through the
hand-written pieces below.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM Challenge 2025). Nothing here changes the maths or the weights: a FastMaskedLM
has MaskedLM's parameters, buffers and state_dict, and test_amlm.py checks each piece, and the whole model,
against its plain twin. model.py never imports this file; train.py and evaluate.py pick the class (--fast,
the default, or --no-fast; train.py's --compile compiles the plain one), the way nanochat's fp8 training leaves
its gpt.py untouched.

    model = FastMaskedLM(ModelConfig(...), nhot_table=table)   # what train.py and evaluate.py use
    plain = MaskedLM(model.config); plain.load_state_dict(model.state_dict())   # the same model, plain path

What each piece saves (docs/performance.md): on a CPU a training step is bound by memory
traffic as much as by matmuls, so most of these avoid building or copying whole tensors:
  - RotaryQKV: RoPE fused with splitting q, k, v out of one projection (no zero-filled slice gradients)
  - dropout_mask / DropoutAdd: dropout masks from 16 bits of an int64 draw each, and the residual add
    fused with its dropout (bernoulli_ is slow on CPU; autograd's addcmul rescales the mask again)
  - LinearCrossEntropy: the tied head fused with its loss, no (n, V) gradient ever built
  - NHotSum: the N-hot sum without pads, its gradient one more embedding_bag over the transposed table
  - forward: the last block runs its projection and MLP only on the rows that have a target, and the
    input lookup's gradient is sparse (only the looked-up rows), added into the head's dense gradient
"""
import torch
import torch.nn.functional as F

from model import MaskedLM, attention

# -----------------------------------------------------------------------------
# RoPE fused with the q, k, v split

class RotaryQKV(torch.autograd.Function):
    """The fused qkv projection (B, T, 3*nh, hd) -> q, k, v, each (B, nh, T, hd) and contiguous, with
    apply_rope on q and k and the 1/sqrt(hd) attention scale folded into q's tables (a free multiply).
    Same maths as slicing + apply_rope + transpose, with a hand-written backward: autograd through
    those slices zero-fills and copies whole gradient buffers.
    Example: T=1 (angle 0), scale 0.5: q = 0.5 * x[:, :nh], k = x[:, nh:2nh], v = x[:, 2nh:], transposed."""

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
            o = torch.mul(xi, c, out=out[i])  # one full-width op, then two on halves
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

# -----------------------------------------------------------------------------
# dropout

def dropout_mask(x, p):
    """A random mask shaped like x, in x's dtype: 0 with probability p, else 1/(1-p) (what F.dropout
    multiplies by). Each int64 draw gives four uniform 16-bit numbers, and an element is dropped when its
    number is among the lowest p * 2^16 (p is rounded to a multiple of 1/65536).
    Example: p=0.1 -> keep u >= 6554 - 32768, with probability 58982/65536 = 0.89999, as 1/0.9 = 1.111."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # 64 uniform bits per draw
    u = bits.view(torch.int16)[:n].view(x.shape)  # four int16 per draw, each uniform on [-32768, 32767]
    keep = torch.ge(u, round(p * 65536) - 32768, out=torch.empty_like(x))  # 1.0 or 0.0, straight in x's dtype
    return keep.mul_(1 / (1 - p))

def own_dropout(x, p, training):
    """Whether dropout runs on dropout_mask: only where it pays, training on CPU with p > 0."""
    return training and p > 0 and x.device.type == "cpu"

def dropout(x, p, training):
    """F.dropout: zero each element with probability p and scale the rest by 1/(1-p)."""
    if not own_dropout(x, p, training):
        return F.dropout(x, p, training)
    return x * dropout_mask(x, p)

class DropoutAdd(torch.autograd.Function):
    """x + y * m for a saved 0-or-1/(1-p) mask m: one pass forward and one backward (autograd's own
    addcmul backward converts and rescales the mask again on every call).
    Example: x [1, 1], y [2, 2], m [0, 2] -> [1, 5]; gradient g -> (g, g * m)."""

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

# -----------------------------------------------------------------------------
# the tied head fused with its loss

class LinearCrossEntropy(torch.autograd.Function):
    """The tied head and its loss in one op: logits = h E^T + b and F.cross_entropy(logits.float(), targets),
    the mean over targets != -100; returns (logits, loss). Same maths as F.linear + F.cross_entropy, but the
    backward never builds the (n, V) gradient d loss / d logits = (softmax - onehot) * w. It walks the
    vocabulary in slices of 2048 columns and feeds each softmax slice, while it is in cache, to the three
    products that need it (dh, dE, db); the one-hot part touches only the target rows. A fresh (n, V)
    float tensor is served by mmap and page-faulted on first touch: the library pair allocates four per step
    (the logits, the log-probabilities, two gradients), this one only the logits it returns.
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

# -----------------------------------------------------------------------------
# the N-hot sum without pads

class NHotSum(torch.autograd.Function):
    """N . E_sub, the (V, C) matrix of each token's unit vectors summed with its 1/sqrt(k) weights: one embedding_bag
    over the flat table. Its gradient for E_sub, N^T . g, is the same kind of sum over the transposed table (for
    each unit, the tokens that contain it), so the backward is one more embedding_bag instead of the library's
    sort of every unit id and scatter.
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

def flatten_nhot(ids, w, n_units):
    """The padded (V, max_units) table without its pads, as embedding_bag takes it: every token's unit ids and
    weights in one flat row plus where each token's units start; and the same table transposed, each unit's
    tokens, for the backward. Returns (bag, bag_t), each (ids, offsets, weights).
    Example: units [[3, 5, pad], [5, pad, pad]], 6 units -> ids [3, 5, 5], offsets [0, 2];
    transposed: tokens [0, 0, 1], offsets [0, 0, 0, 0, 1, 1] (unit 3: token 0; unit 5: tokens 0 and 1)."""
    present = w > 0
    flat, fw, k = ids[present], w[present], present.sum(1)  # k: units per token
    token = torch.arange(len(k), device=ids.device).repeat_interleave(k)  # each entry's token
    by_unit = torch.argsort(flat, stable=True)
    starts = lambda counts: F.pad(counts.cumsum(0)[:-1], (1, 0))  # where each row's entries begin
    return (flat, starts(k), fw), (token[by_unit], starts(torch.bincount(flat, minlength=n_units)), fw[by_unit])

def nhot_sum(model):
    """N . E_sub through NHotSum. The flat tables derive from the model's padded table, so they are rebuilt
    whenever it changes (a state-dict load writes into it, a move to another device replaces it)."""
    ids, w = model.nhot_ids, model.nhot_w
    c = getattr(model, "_nhot_flat", None)
    if c is None or c[0] is not ids or c[1] is not w or c[2] != (ids._version, w._version):
        with torch.inference_mode(False):  # built while evaluating, it must still serve training
            c = model._nhot_flat = (ids, w, (ids._version, w._version), flatten_nhot(ids, w, model.config.n_units))
    return NHotSum.apply(model.sub.weight, *c[3])

# -----------------------------------------------------------------------------
# the forward pass

def block(blk, x, cos, sin, key_mask, rows=None):
    """model.Block.forward through the pieces above. x (B, T, C) -> (B, T, C); with rows = (b, t), index tensors
    of shape (n,), only those positions' outputs (n, C) (rows may repeat): every position still serves as a key
    and value, but the projection, residual dropouts and MLP after the attention work row by row, so in the last
    block the other rows would be work for nothing."""
    B, T, C = x.shape
    qkv = blk.qkv(blk.ln1(x)).view(B, T, 3 * blk.n_head, C // blk.n_head)  # (B, T, 3nh, hd)
    cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)  # keep bf16 under autocast
    q, k, v = RotaryQKV.apply(qkv, cos, sin, (C // blk.n_head) ** -0.5)  # each (B, nh, T, hd), q scaled
    y = attention(q, k, v, key_mask, scale=1.0).transpose(1, 2)  # (B, T, nh, hd)
    if rows is not None:
        x, y = x[rows], y[rows]  # (n, C), (n, nh, hd)
    y = y.reshape(x.shape)  # (B, T, C) or (n, C)
    x = dropout_add(x, blk.proj(y), blk.p, blk.training)
    return dropout_add(x, blk.mlp(blk.ln2(x)), blk.p, blk.training)

class FastMaskedLM(MaskedLM):
    """model.MaskedLM through the pieces above: the same inputs, outputs, maths and state_dict."""

    def embedding_matrix(self):
        return self.tok.weight + nhot_sum(self) if self.config.nhot else self.tok.weight

    def forward(self, input_ids, labels=None, attention_mask=None):
        E = self.embedding_matrix()
        # sparse: the lookup's gradient is only the B*T looked-up rows, added straight into the head's dense (V, C)
        # gradient for E, instead of a zeroed (V, C) buffer plus one more (V, C) addition
        x = dropout(F.embedding(input_ids, E, sparse=True), self.config.dropout, self.training)  # (B, T, C)
        cos, sin = self.rope(input_ids.shape[1], input_ids.device)
        key_mask = None  # None keeps sdpa on its fastest kernel when nothing is padded
        if attention_mask is not None:
            key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        rows = None
        if labels is not None:
            # only the positions with a target reach the loss: the head, and the last block after its attention,
            # run on those rows alone (in training, the last block's dropout masks are drawn for these rows only)
            b, t = (labels != -100).nonzero(as_tuple=True)  # (n,) each: where the targets are
            n = len(b)
            # round the row count up to a multiple of 128: a handful of distinct (n, V) shapes instead of one per
            # step keeps the allocator reusing its blocks (otherwise a CPU process keeps growing)
            i = F.pad(torch.arange(n, device=b.device), (0, -n % 128))  # the pad rows repeat the first target ...
            rows = b[i], t[i]
            y = labels[rows]
            y[n:] = -100  # ... with no target, so they add nothing to the loss or the gradients
        for blk in self.blocks[:-1]:
            x = block(blk, x, cos, sin, key_mask)
        x = block(self.blocks[-1], x, cos, sin, key_mask, rows)  # (B, T, C), or (n rounded up, C) with labels
        if labels is None:
            return F.linear(self.ln_f(x), E, self.out_bias), None  # (B, T, V)
        logits, loss = LinearCrossEntropy.apply(self.ln_f(x), E, self.out_bias, y)  # (n rounded up, V), mean CE
        return logits[:n], loss  # (n_labelled, V)
