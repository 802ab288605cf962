"""
An amlm encoder as a Hugging Face model: configuration and model classes for transformers' Auto classes.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining
BabyLMs" (BabyLM Challenge 2025). export.py copies this file and amlm's model.py (which imports only torch)
next to config.json, and transformers copies both when it loads the folder. This file is only the Hugging Face
glue: the maths is model.py's MaskedLM, the same weights and the same outputs.

    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained("hf/run", trust_remote_code=True)
    logits = model(input_ids=ids, attention_mask=mask).logits       # (B, T, vocab): MaskedLM's tied head

AmlmModel's last_hidden_state is MaskedLM.encode's output, after the final LayerNorm (what the tied head reads).
The N-hot matrix E = E_tok + N . E_sub is recomputed at every forward pass, so fine-tuning trains both tables, as
pretraining did. token_type_ids are accepted and ignored (the model has no segment embedding).
"""
import importlib.util
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

try:
    from .model import MaskedLM, ModelConfig
except ImportError:  # transformers 4.51 names the module after the folder, and a dot in that name breaks the package
    spec = importlib.util.spec_from_file_location("amlm_model", Path(__file__).with_name("model.py"))
    spec.loader.exec_module(model := importlib.util.module_from_spec(spec))
    MaskedLM, ModelConfig = model.MaskedLM, model.ModelConfig


class AmlmConfig(PretrainedConfig):
    """amlm's model.ModelConfig fields under their own names; hidden_size and friends are aliases."""
    model_type = "amlm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "intermediate_size": "d_ff", "hidden_dropout_prob": "dropout"}

    def __init__(self, vocab_size=16384, n_layer=4, n_head=4, d_model=256, d_ff=1024, max_len=256, dropout=0.1,
                 nhot=False, n_units=0, max_units=0, classifier_dropout=None, **kwargs):
        self.vocab_size, self.n_layer, self.n_head, self.d_model, self.d_ff = vocab_size, n_layer, n_head, d_model, d_ff
        self.max_len, self.dropout, self.nhot, self.n_units, self.max_units = max_len, dropout, nhot, n_units, max_units
        self.classifier_dropout = classifier_dropout
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("tie_word_embeddings", False)  # the head uses E itself; nothing for transformers to tie
        super().__init__(**kwargs)

    def model_config(self):
        """The model.ModelConfig of these fields. Example: AmlmConfig(n_layer=2).model_config().n_layer -> 2"""
        names = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_len", "dropout", "nhot", "n_units", "max_units")
        return ModelConfig(**{k: getattr(self, k) for k in names})


class AmlmPreTrainedModel(PreTrainedModel):
    """What the three models share: the config class, the prefix of the encoder's weights ("amlm."), the init of new
    weights. Every model holds model.py's MaskedLM, out_bias included; only AmlmForMaskedLM uses that bias, so a
    classifier fine-tuned with DDP needs find_unused_parameters (the BabyLM pipeline fine-tunes on one device)."""
    config_class = AmlmConfig
    base_model_prefix = "amlm"

    def _init_weights(self, module):  # for weights a checkpoint lacks (a new classifier): as amlm initialises
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)


class AmlmModel(AmlmPreTrainedModel):
    """The encoder: input_ids (B, T) -> last_hidden_state (B, T, d_model) = MaskedLM.encode's output. No logits."""

    def __init__(self, config):
        super().__init__(config)
        self.lm = MaskedLM(config.model_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.lm.tok

    def set_input_embeddings(self, value):
        self.lm.tok = value

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=None, **kwargs):
        h, _ = self.lm.encode(input_ids, attention_mask)
        out = BaseModelOutput(last_hidden_state=h)
        return out if return_dict is not False else out.to_tuple()


class AmlmForMaskedLM(AmlmPreTrainedModel):
    """The pretraining model: logits (B, T, vocab) from MaskedLM's tied head; with labels (-100 = no target),
    loss = mean cross-entropy over the targets."""

    def __init__(self, config):
        super().__init__(config)
        self.amlm = AmlmModel(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None, **kwargs):
        logits, _ = self.amlm.lm(input_ids, attention_mask=attention_mask)
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
        h, _ = self.amlm.lm.encode(input_ids, attention_mask)
        logits = self.classifier(self.dropout(h[:, 0]))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1), labels.float()) if self.num_labels == 1
                    else F.cross_entropy(logits, labels))
        out = SequenceClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()
