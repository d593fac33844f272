"""A torch-free text tower: open_clip's BPE tokenizer and CLIP text transformer in numpy,
and the sentence-encoder (BERT) tower of clipsearch.sentence_tower with its word pieces.

Cold `search` must not pay for importing torch and open_clip (seconds). For the standard
CLIP text tower (token + position embeddings, pre-LN residual attention blocks with a causal
mask, final LayerNorm, EOT pooling, projection) the weights are read straight from the
safetensors checkpoint the catalogue's model came from. Anything else falls back to torch.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.weights_cache import cached_arrays, cached_marshal

LAYER_NORM_EPS = 1e-5
SENTENCE_TEXT_KIND = "bert-sentence"
"""text_cfg.kind of a clipsearch.sentence_tower model (a BERT sentence encoder as text tower)."""


def is_sentence_cfg(config: dict[str, Any]) -> bool:
    """True for a model config (or a whole open_clip_config.json) with a sentence text tower."""
    model_cfg = config.get("model_cfg", config)
    return (model_cfg.get("text_cfg") or {}).get("kind") == SENTENCE_TEXT_KIND


@lru_cache(maxsize=1)
def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_tables(vocab_file: str, byte_encoder: dict[int, str],
                ) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Token ids and merge ranks from open_clip's vocabulary file."""
    merges_text = gzip.open(vocab_file).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
    vocab = list(byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<start_of_text>", "<end_of_text>"])
    encoder = {v: i for i, v in enumerate(vocab)}
    return encoder, {(m[0], m[1]): i for i, m in enumerate(merges)}


_PLAIN_TEXT = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
"""Printable ASCII without '&', tabs and newlines: text that ftfy.fix_text and html.unescape
return unchanged (tests/test_text_tower.py checks it), so its tokens need neither."""


class BpeTokenizer:
    """open_clip's SimpleTokenizer (clean='lower'), same ids, without torch."""

    def __init__(self, context_length: int = 77) -> None:
        import regex

        self.context_length = context_length
        self.byte_encoder = _bytes_to_unicode()
        vocab_file = str(_open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz")
        self.encoder, self.bpe_ranks = cached_marshal(
            vocab_file, f"bpe-py{sys.version_info[0]}{sys.version_info[1]}",
            lambda: _bpe_tables(vocab_file, self.byte_encoder))
        special = ["<start_of_text>", "<end_of_text>"]
        self.cache: dict[str, str] = {t: t for t in special}
        self.pat = regex.compile(
            "|".join(special)
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot, self.eot = self.encoder[special[0]], self.encoder[special[1]]

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        if not _PLAIN_TEXT.fullmatch(text):  # plain ASCII is what ftfy and unescape leave be
            import ftfy  # ~50 ms of a cold search's start-up

            text = html.unescape(html.unescape(ftfy.fix_text(text)))
        text = text.strip()
        text = " ".join(text.split()).strip().lower()
        ids: list[int] = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot] + self.encode(text) + [self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
            out[row, : len(tokens)] = tokens
        return out


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray,
                eps: float = LAYER_NORM_EPS) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz & Stegun 7.1.26), vectorised."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                       + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as torch's nn.GELU."""
    return 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-1.702 * x))


def describe_text_tower(model: Any, model_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """What the numpy path needs to rebuild this open_clip model's text tower, or None if
    the tower is not the standard CLIP one. Called with the torch model at index time."""
    text_cfg = dict(model_cfg.get("text_cfg") or {})
    if text_cfg.get("kind") == SENTENCE_TEXT_KIND:
        bert = text_cfg["bert"]
        return {
            "kind": SENTENCE_TEXT_KIND,
            "layers": int(bert["num_hidden_layers"]),
            "heads": int(bert["num_attention_heads"]),
            "eps": float(bert.get("layer_norm_eps", 1e-12)),
            "context_length": int(text_cfg.get("context_length", 32)),
        }
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        return None
    if text_cfg.get("no_causal_mask") or text_cfg.get("final_ln_after_pool"):
        return None
    if text_cfg.get("pool_type", "argmax") != "argmax" or text_cfg.get("embed_cls"):
        return None
    if text_cfg.get("tokenizer_kwargs") or text_cfg.get("norm_kwargs"):
        return None
    if text_cfg.get("ls_init_value") is not None:
        return None
    prefix = "text." if hasattr(model, "text") and not hasattr(model, "token_embedding") else ""
    blocks = (model.text.transformer if prefix else model.transformer).resblocks
    act = type(blocks[0].mlp.gelu).__name__
    if act not in ("GELU", "QuickGELU"):
        return None
    return {
        "prefix": prefix,
        "layers": len(blocks),
        "heads": int(blocks[0].attn.num_heads),
        "context_length": int(text_cfg.get("context_length", 77)),
        "quick_gelu": act == "QuickGELU",
    }


_MATMUL_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


def read_logit_scale(weights_file: str) -> float:
    """The model's learned temperature, exp(logit_scale), as OpenClipEncoder.logit_scale
    reports it (100 when the checkpoint has none)."""
    from safetensors import safe_open

    with safe_open(weights_file, framework="np") as f:
        if "logit_scale" not in f.keys():
            return 100.0
        return float(np.exp(np.asarray(f.get_tensor("logit_scale"), np.float64)).reshape(-1)[0])


_PACK_LAYOUT = "v1"
"""Bump when the arrays the numpy towers expect change (names, dtypes, transposes)."""


def _clip_text_arrays(weights_file: str, prefix: str) -> dict[str, np.ndarray]:
    """The text tower's arrays from a checkpoint, float32, matmul weights as (in, out)."""
    from safetensors import safe_open

    w: dict[str, np.ndarray] = {}
    with safe_open(weights_file, framework="np") as f:
        keys = set(f.keys())
        if prefix == "":
            wanted = [k for k in keys if not k.startswith(("visual.", "logit_"))]
        else:
            wanted = [k for k in keys if k.startswith(prefix)
                      and not k.startswith(prefix + "visual")]
        for k in wanted:
            w[k[len(prefix):]] = f.get_tensor(k).astype(np.float32, copy=False)
    # Weight matrices as (in, out), contiguous: one query's products read them in order
    # (about 1.6x faster than multiplying by the stored (out, in) transposed view).
    for k in [k for k in w if k.endswith(_MATMUL_WEIGHTS)]:
        w[k] = np.ascontiguousarray(w[k].T)
    return w


class _NumpyTower:
    """What both numpy towers share: weights from the per-user cache (built from the
    checkpoint on a miss), the checkpoint's temperature, and encoding that rebuilds the
    cached arrays once if they give non-finite vectors (a damaged cache file)."""

    def __init__(self, weights_file: str, tower: dict[str, Any], kind: str,
                 build: Callable[[], dict[str, np.ndarray]]) -> None:
        self.tower = tower
        self.weights_file = weights_file
        self._kind, self._build = kind, build
        self.w = cached_arrays(weights_file, kind, build)

    @property
    def logit_scale(self) -> float:
        return read_logit_scale(self.weights_file)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            out = self._encode(texts)
            if not np.isfinite(out).all():
                self.w = cached_arrays(self.weights_file, self._kind, self._build, refresh=True)
                out = self._encode(texts)
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class NumpyTextEncoder(_NumpyTower):
    """Encode texts with numpy only; equal to open_clip's encode_text(normalize=True)."""

    def __init__(self, weights_file: str, tower: dict[str, Any]) -> None:
        super().__init__(weights_file, tower,
                         f"clip-text-{_PACK_LAYOUT}-{tower['prefix'].strip('.') or 'root'}",
                         lambda: _clip_text_arrays(weights_file, tower["prefix"]))
        required = ("token_embedding.weight", "positional_embedding", "ln_final.weight")
        if not all(r in self.w for r in required):
            raise KeyError(f"{weights_file}: not a standard CLIP text tower")
        self.tokenizer = BpeTokenizer(tower["context_length"])
        self.context_length = tower["context_length"]

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) + 2

    def _encode(self, texts: list[str]) -> np.ndarray:
        w = self.w
        tokens = self.tokenizer(texts)
        # The causal mask means no position sees a later one: positions after the last
        # end-of-text token cannot change any pooled output, so they are not computed.
        n_used = int(tokens.argmax(-1).max()) + 1
        tokens = tokens[:, :n_used]
        x = w["token_embedding.weight"][tokens] + w["positional_embedding"][:n_used]
        n_ctx = x.shape[1]
        mask = np.triu(np.full((n_ctx, n_ctx), -np.inf, dtype=np.float32), 1)
        heads = self.tower["heads"]
        act = _quick_gelu if self.tower["quick_gelu"] else _gelu
        for i in range(self.tower["layers"]):
            b = f"transformer.resblocks.{i}."
            h = _layer_norm(x, w[b + "ln_1.weight"], w[b + "ln_1.bias"])
            qkv = h @ w[b + "attn.in_proj_weight"] + w[b + "attn.in_proj_bias"]
            q, k, v = np.split(qkv, 3, axis=-1)
            bsz, n, d = q.shape
            hd = d // heads

            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(bsz, n, heads, hd).transpose(0, 2, 1, 3)

            q, k, v = split(q), split(k), split(v)
            att = (q @ k.transpose(0, 1, 3, 2)) * float(hd) ** -0.5 + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = (att @ v).transpose(0, 2, 1, 3).reshape(bsz, n, d)
            x = x + o @ w[b + "attn.out_proj.weight"] + w[b + "attn.out_proj.bias"]
            h = _layer_norm(x, w[b + "ln_2.weight"], w[b + "ln_2.bias"])
            h = act(h @ w[b + "mlp.c_fc.weight"] + w[b + "mlp.c_fc.bias"])
            x = x + h @ w[b + "mlp.c_proj.weight"] + w[b + "mlp.c_proj.bias"]
        x = _layer_norm(x, w["ln_final.weight"], w["ln_final.bias"])
        pooled = x[np.arange(len(texts)), tokens.argmax(-1)]
        if "text_projection" in w:
            pooled = pooled @ w["text_projection"]
        elif "text_projection.weight" in w:
            pooled = pooled @ w["text_projection.weight"].T + w.get("text_projection.bias", 0)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def _bert_text_arrays(weights_file: str) -> dict[str, np.ndarray]:
    """A sentence tower's arrays from a clipsearch.sentence_tower checkpoint, float32."""
    from safetensors import safe_open

    w: dict[str, np.ndarray] = {}
    with safe_open(weights_file, framework="np") as f:
        for k in f.keys():
            if k.startswith("text."):
                w[k[len("text."):]] = f.get_tensor(k).astype(np.float32, copy=False)
    return w


class NumpyBertEncoder(_NumpyTower):
    """A sentence-encoder text tower (clipsearch.sentence_tower) in numpy: word pieces, BERT
    post-LN layers, mean pooling, L2 norm, optional projection; equal to the torch model."""

    def __init__(self, weights_file: str, tower: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        super().__init__(weights_file, tower, f"bert-text-{_PACK_LAYOUT}",
                         lambda: _bert_text_arrays(weights_file))
        if "bert.embeddings.word_embeddings.weight" not in self.w:
            raise KeyError(f"{weights_file}: not a sentence-encoder text tower")
        self.context_length = int(tower["context_length"])
        self._tok = Tokenizer.from_file(str(Path(weights_file).parent / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=self.context_length)

    def token_count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids) + 2

    def _encode(self, texts: list[str]) -> np.ndarray:
        w, eps, heads = self.w, self.tower["eps"], self.tower["heads"]
        encodings = self._tok.encode_batch(list(texts))
        n = max(len(e.ids) for e in encodings)
        tokens = np.zeros((len(texts), n), dtype=np.int64)
        for row, enc in enumerate(encodings):
            tokens[row, : len(enc.ids)] = enc.ids
        mask = tokens != 0
        e = "bert.embeddings."
        x = (w[e + "word_embeddings.weight"][tokens] + w[e + "position_embeddings.weight"][:n]
             + w[e + "token_type_embeddings.weight"][0])
        x = _layer_norm(x, w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"], eps)
        bias = np.where(mask, 0.0, -np.inf).astype(np.float32)[:, None, None, :]
        bsz, _, d = x.shape
        hd = d // heads
        for i in range(self.tower["layers"]):
            b = f"bert.encoder.layer.{i}."

            def lin(h: np.ndarray, name: str) -> np.ndarray:
                return h @ w[b + name + ".weight"].T + w[b + name + ".bias"]  # noqa: B023

            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(bsz, n, heads, hd).transpose(0, 2, 1, 3)

            q = split(lin(x, "attention.self.query"))
            k = split(lin(x, "attention.self.key"))
            v = split(lin(x, "attention.self.value"))
            att = (q @ k.transpose(0, 1, 3, 2)) * float(hd) ** -0.5 + bias
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = (att @ v).transpose(0, 2, 1, 3).reshape(bsz, n, d)
            x = _layer_norm(x + lin(o, "attention.output.dense"),
                            w[b + "attention.output.LayerNorm.weight"],
                            w[b + "attention.output.LayerNorm.bias"], eps)
            h = _gelu(lin(x, "intermediate.dense"))
            x = _layer_norm(x + lin(h, "output.dense"), w[b + "output.LayerNorm.weight"],
                            w[b + "output.LayerNorm.bias"], eps)
        m = mask[..., None].astype(np.float32)
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        if "proj.weight" in w:
            pooled = pooled @ w["proj.weight"].T
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def load_fast_text_encoder(record: dict[str, Any]) -> NumpyTextEncoder | NumpyBertEncoder | None:
    """The numpy text tower for a recorded model, if its weights file is unchanged."""
    path = record.get("weights")
    if not path or not str(path).endswith(".safetensors"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size != record.get("size") or st.st_mtime_ns != record.get("mtime_ns"):
        return None
    try:
        if record["tower"].get("kind") == SENTENCE_TEXT_KIND:
            return NumpyBertEncoder(path, record["tower"])
        return NumpyTextEncoder(path, record["tower"])
    except (KeyError, OSError, ValueError):
        return None


def fast_text_record(weights_file: str | None, tower: dict[str, Any] | None) -> str | None:
    """JSON the catalogue keeps so later searches can take the numpy path."""
    if not weights_file or tower is None or not weights_file.endswith(".safetensors"):
        return None
    st = os.stat(weights_file)
    return json.dumps({"weights": weights_file, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "tower": tower})
