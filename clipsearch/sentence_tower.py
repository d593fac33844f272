"""A CLIP model whose text tower is a pretrained BERT sentence encoder (LiT-style, torch).

open_clip's own text towers learn language from the image captions alone; a small model
trained on a few thousand captions knows no words beyond them. Here the text side is a
BERT-family sentence encoder (mean pooling, L2 normalisation, as sentence-transformers
runs all-MiniLM-L6-v2) followed by a linear projection into the shared space, and the
image side is an open_clip vision tower. Weights keep the Hugging Face names under
``text.bert.`` so a pretrained encoder loads straight from its safetensors file.

This module imports torch at import time: import it only inside functions that need it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TOKENIZER_FILE_NAME = "tokenizer.json"


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = int(cfg["hidden_size"])
        self.word_embeddings = nn.Embedding(int(cfg["vocab_size"]), hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(int(cfg["max_position_embeddings"]), hidden)
        self.token_type_embeddings = nn.Embedding(int(cfg.get("type_vocab_size", 2)), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=float(cfg.get("layer_norm_eps", 1e-12)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.word_embeddings(tokens) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)  # type: ignore[no-any-return]


class _Dense(nn.Module):
    """A Linear (named ``dense``) with an optional residual LayerNorm, as BERT names them."""

    def __init__(self, n_in: int, n_out: int, eps: float | None) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(n_out, eps=eps)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _Attention(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden)
        self.output = _Dense(hidden, hidden, eps)


class _Layer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, inner = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.heads = int(cfg["num_attention_heads"])
        self.attention = _Attention(hidden, eps)
        self.intermediate = _Dense(hidden, inner, None)
        self.output = _Dense(inner, hidden, eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        att = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(att.query(x)), heads(att.key(x)), heads(att.value(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        o = o.transpose(1, 2).reshape(b, n, d)
        out = self.attention.output
        x = out.LayerNorm(x + out.dense(o))
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(h))  # type: ignore[no-any-return]


class _Encoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(int(cfg["num_hidden_layers"])))


class BertTrunk(nn.Module):
    """BERT embeddings + encoder, mean-pooled over real tokens, L2-normalised."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != 0
        x = self.embeddings(tokens)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1).to(x.dtype)


class SentenceTextTower(nn.Module):
    """Tokens -> BERT sentence embedding -> linear projection into the CLIP space."""

    def __init__(self, text_cfg: dict[str, Any], embed_dim: int) -> None:
        super().__init__()
        bert = text_cfg["bert"]
        self.context_length = int(text_cfg.get("context_length", 32))
        self.bert = BertTrunk(bert)
        # With "proj": false the sentence embedding itself is the CLIP text embedding (a fully
        # locked text tower, LiT-style); embed_dim must then equal the BERT hidden size.
        self.proj: nn.Module
        if text_cfg.get("proj", True):
            self.proj = nn.Linear(int(bert["hidden_size"]), embed_dim, bias=False)
        elif int(bert["hidden_size"]) != embed_dim:
            raise ValueError(f"text_cfg proj=false needs embed_dim {bert['hidden_size']}, "
                             f"got {embed_dim}")
        else:
            self.proj = nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.project(self.bert(tokens))

    def project(self, sentence: torch.Tensor) -> torch.Tensor:
        """Map trunk outputs (possibly cached) into the CLIP space."""
        return self.proj(sentence)  # type: ignore[no-any-return]


class SentenceCLIP(nn.Module):
    """An open_clip vision tower and a sentence-encoder text tower in one embedding space."""

    def __init__(self, embed_dim: int, vision_cfg: dict[str, Any],
                 text_cfg: dict[str, Any]) -> None:
        super().__init__()
        from open_clip.model import _build_vision_tower

        self.visual = _build_vision_tower(embed_dim, vision_cfg)
        self.text = SentenceTextTower(text_cfg, embed_dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.encode_image(image, True), self.encode_text(tokens, True),
                self.logit_scale.exp())


class WordPieceTokenizer:
    """The sentence encoder's own tokenizer (tokenizer.json), padded to a fixed context."""

    def __init__(self, tokenizer_file: str | Path, context_length: int) -> None:
        from tokenizers import Tokenizer

        self.context_length = context_length
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=context_length)

    def encode(self, text: str) -> list[int]:
        """Word-piece ids without [CLS]/[SEP] (for counting against the context)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def ids(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(list(texts))):
            out[row, : len(enc.ids)] = enc.ids
        return out

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.from_numpy(self.ids(texts))


def create_sentence_clip(model_cfg: dict[str, Any], seed: int = 0) -> SentenceCLIP:
    torch.manual_seed(seed)
    return SentenceCLIP(int(model_cfg["embed_dim"]), dict(model_cfg["vision_cfg"]),
                        dict(model_cfg["text_cfg"]))


def load_pretrained_trunk(model: SentenceCLIP, weights_file: str | Path) -> None:
    """Copy a Hugging Face BERT checkpoint (safetensors) into the text trunk."""
    from safetensors.torch import load_file

    state = load_file(str(weights_file))
    own = model.text.bert.state_dict()
    wanted = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(wanted))
    if missing:
        raise KeyError(f"{weights_file}: BERT weights missing: {', '.join(missing[:3])}")
    model.text.bert.load_state_dict(wanted)


def load_sentence_clip(folder: Path) -> tuple[SentenceCLIP, WordPieceTokenizer, dict[str, Any]]:
    """Rebuild a SentenceCLIP checkpoint folder (config, weights, tokenizer.json)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    model_cfg = config.get("model_cfg", config)
    model = create_sentence_clip(model_cfg)
    state = load_file(str(folder / "open_clip_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    tokenizer = WordPieceTokenizer(folder / TOKENIZER_FILE_NAME,
                                   int(model_cfg["text_cfg"].get("context_length", 32)))
    model.visual.preprocess_cfg = dict(config.get("preprocess_cfg") or {})
    return model.eval(), tokenizer, config
