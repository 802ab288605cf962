"""
An amlm encoder as a Hugging Face model: configuration and model classes for transformers' Auto classes.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining
BabyLMs" (BabyLM Challenge 2025). This file travels alone with an exported checkpoint (export.py copies it
verbatim next to config.json), so it imports only torch and transformers, never the amlm project. It is the
plain maths of amlm's model.py (same weights, same outputs, none of its CPU-speed pieces):

    E = E_tok + N . E_sub                  the N-hot embedding matrix (E = E_tok without N-hot)
    x = dropout(E[input_ids])
    x = x + dropout(proj(attn(ln1(x))))    pre-LayerNorm blocks, bias-free, RoPE on q and k, no attention dropout
    x = x + dropout(out(gelu(fc(ln2(x)))))
    h = ln_f(x)                            AmlmModel's last_hidden_state
    logits = h E^T + out_bias              AmlmForMaskedLM's tied head: (B, T, vocab)

    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained("hf/run", trust_remote_code=True)
    logits = model(input_ids=ids, attention_mask=mask).logits

N-hot: row i of N holds token i's character 1-3-gram units with weight 1/sqrt(k) for k units (the buffers
nhot_ids and nhot_w, padded with weight 0). E is recomputed at every forward pass, so fine-tuning trains
E_tok and E_sub, as pretraining did. token_type_ids are accepted and ignored (the model has no segment embedding).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

# -----------------------------------------------------------------------------
# configuration


class AmlmConfig(PretrainedConfig):
    """amlm's model.ModelConfig fields under their own names; hidden_size and friends are aliases."""
    model_type = "amlm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "intermediate_size": "d_ff", "hidden_dropout_prob": "dropout"}

    def __init__(self, vocab_size=16384, n_layer=4, n_head=4, d_model=256, d_ff=1024, max_len=256, dropout=0.1,
                 nhot=False, n_units=0, max_units=0, rope_base=10000.0, layer_norm_eps=1e-5, classifier_dropout=None,
                 **kwargs):
        self.vocab_size, self.n_layer, self.n_head, self.d_model, self.d_ff = vocab_size, n_layer, n_head, d_model, d_ff
        self.max_len, self.dropout, self.nhot, self.n_units, self.max_units = max_len, dropout, nhot, n_units, max_units
        self.rope_base, self.layer_norm_eps, self.classifier_dropout = rope_base, layer_norm_eps, classifier_dropout
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("tie_word_embeddings", False)  # the head uses E itself; nothing for transformers to tie
        super().__init__(**kwargs)

# -----------------------------------------------------------------------------
# the encoder


def rope(T, head_dim, base, device):
    """cos, sin of shape (T, head_dim/2): position t turns channel pair j by t * base^(-2j/head_dim).
    Example: T=2, head_dim=2 -> cos [[1.], [0.5403]], sin [[0.], [0.8415]] (angles 0 and 1 rad)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head's channels (x: (B, nh, T, hd)) by the position's angles.
    Example: x = [1, 0] at an angle of 90 degrees (cos 0, sin 1) -> [0, 1]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class AmlmBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, eps = config.d_model, config.layer_norm_eps
        self.n_head, self.p = config.n_head, config.dropout
        self.ln1 = nn.LayerNorm(C, eps=eps, bias=False)
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.ln2 = nn.LayerNorm(C, eps=eps, bias=False)
        self.fc = nn.Linear(C, config.d_ff, bias=False)
        self.out = nn.Linear(config.d_ff, C, bias=False)

    def forward(self, x, cos, sin, key_mask):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3 * self.n_head, C // self.n_head).transpose(1, 2).chunk(3, dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # each (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # softmax(q k^T / sqrt(hd)) v
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)), self.p, self.training)
        return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), self.p, self.training)


class AmlmPreTrainedModel(PreTrainedModel):
    config_class = AmlmConfig
    base_model_prefix = "amlm"
    _keys_to_ignore_on_load_unexpected = [r"^out_bias$"]  # the MLM head's bias, unused by the encoder alone

    def _init_weights(self, module):  # for weights a checkpoint lacks (a new classifier): as amlm initialises
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)


class AmlmModel(AmlmPreTrainedModel):
    """The encoder: input_ids (B, T) -> last_hidden_state (B, T, d_model), after the final LayerNorm ln_f
    (the encoder's last step in a pre-LayerNorm model; the MLM head reads exactly this). No logits."""

    def __init__(self, config):
        super().__init__(config)
        V, C = config.vocab_size, config.d_model
        self.tok = nn.Embedding(V, C)
        if config.nhot:
            self.sub = nn.Embedding(config.n_units, C)
            self.register_buffer("nhot_ids", torch.zeros(V, config.max_units, dtype=torch.long))
            self.register_buffer("nhot_w", torch.zeros(V, config.max_units))
        self.blocks = nn.ModuleList(AmlmBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_eps, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok

    def set_input_embeddings(self, value):
        self.tok = value

    def embedding_matrix(self):
        """E = E_tok + N . E_sub, (vocab, d_model): each token's unit vectors summed with their weights."""
        if not self.config.nhot:
            return self.tok.weight
        return self.tok.weight + F.embedding_bag(self.nhot_ids, self.sub.weight, per_sample_weights=self.nhot_w, mode="sum")

    def encode(self, input_ids, attention_mask=None, E=None):
        """(last_hidden_state, E): the encoder output and the embedding matrix it used (the head reuses it)."""
        E = self.embedding_matrix() if E is None else E
        x = F.dropout(F.embedding(input_ids, E), self.config.dropout, self.training)  # (B, T, C)
        cos, sin = rope(input_ids.shape[1], self.config.d_model // self.config.n_head, self.config.rope_base, x.device)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, cos, sin, key_mask)
        return self.ln_f(x), E

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=None, **kwargs):
        h, _ = self.encode(input_ids, attention_mask)
        out = BaseModelOutput(last_hidden_state=h)
        return out if return_dict is not False else out.to_tuple()

# -----------------------------------------------------------------------------
# heads


class AmlmForMaskedLM(AmlmPreTrainedModel):
    """The pretraining model: logits (B, T, vocab) = last_hidden_state E^T + out_bias, tied to the input
    embedding; with labels (-100 = no target), loss = mean cross-entropy over the targets."""

    def __init__(self, config):
        super().__init__(config)
        self.amlm = AmlmModel(config)
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None, **kwargs):
        h, E = self.amlm.encode(input_ids, attention_mask)
        logits = F.linear(h, E, self.out_bias)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        out = MaskedLMOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


class AmlmForSequenceClassification(AmlmPreTrainedModel):
    """A linear classifier on the first token's ([CLS]) last_hidden_state; loss: cross-entropy, or mean squared
    error when num_labels == 1 (regression)."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.amlm = AmlmModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None, **kwargs):
        h, _ = self.amlm.encode(input_ids, attention_mask)
        logits = self.classifier(self.dropout(h[:, 0]))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1), labels.float()) if self.num_labels == 1
                    else F.cross_entropy(logits, labels))
        out = SequenceClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()
