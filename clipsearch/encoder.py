"""The model: resolve a model spec, load open_clip offline-first, encode images and texts."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from clipsearch.config import BUNDLED_MODEL, DEFAULT_MODEL
from clipsearch.errors import ModelError

BUNDLED_MODELS_DIR = Path(__file__).parent / "models"
WEIGHT_FILE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HASH_CHUNK_BYTES = 1 << 22
HUB_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the weights that produce vectors; vectors of different keys never mix."""

    key: str
    spec: str
    arch: str
    pretrained: str | None
    checkpoint_hash: str | None
    open_clip_version: str
    dim: int

    @classmethod
    def of(cls, stored: Any) -> ModelInfo:
        """The identity of a model the catalogue recorded (a catalogue.store.StoredModel)."""
        return cls(stored.key, stored.spec, stored.arch, stored.pretrained,
                   stored.checkpoint_hash, stored.open_clip_version, stored.dim)

    def as_record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "spec": self.spec,
            "arch": self.arch,
            "pretrained": self.pretrained,
            "checkpoint_hash": self.checkpoint_hash,
            "open_clip_version": self.open_clip_version,
            "dim": self.dim,
        }


class Encoder(Protocol):
    """What the pipeline needs from a model."""

    info: ModelInfo
    image_size: int

    def preprocess(self, image: Image.Image) -> np.ndarray: ...

    def encode_images(self, batch: np.ndarray) -> np.ndarray: ...

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def token_count(self, text: str) -> int: ...

    @property
    def context_length(self) -> int: ...


@dataclass(frozen=True)
class ResolvedSpec:
    """How to build a model from a user's spec."""

    spec: str
    arch: str
    open_clip_name: str
    pretrained: str | None  # a tag, or None
    weights_file: str | None
    local_dir: str | None


def bundled_models() -> list[str]:
    """Short names of the models shipped inside the package."""
    if not BUNDLED_MODELS_DIR.is_dir():
        return []
    return sorted(
        p.name for p in BUNDLED_MODELS_DIR.iterdir() if (p / "open_clip_config.json").is_file()
    )


def _offline_hint() -> str:
    names = bundled_models()
    if names:
        return (
            f"offline? use the bundled model (`--model {names[0]}`) or a local checkpoint folder "
            "(`--model PATH`); vectors from different models are never mixed"
        )
    return "offline? pass a local checkpoint folder with --model PATH"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _weights_in_dir(folder: Path) -> Path | None:
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_spec(spec: str | None) -> ResolvedSpec:
    """Turn `emoji-mini`, `PATH`, `local-dir:PATH`, `ARCH:TAG` or `ARCH:FILE` into a plan."""
    spec = (spec or DEFAULT_MODEL).strip()
    if spec in bundled_models() or spec == BUNDLED_MODEL:
        folder = BUNDLED_MODELS_DIR / spec
        if not (folder / "open_clip_config.json").is_file():
            raise ModelError(f"bundled model {spec!r} is not in this installation ({folder})")
        return _local_dir(spec, folder)
    if spec.startswith("local-dir:"):
        return _local_dir(spec, Path(spec[len("local-dir:") :]).expanduser())
    candidate = Path(spec).expanduser()
    if candidate.is_dir():
        return _local_dir(str(candidate.resolve()), candidate)
    if ":" in spec:
        arch, pretrained = spec.split(":", 1)
        weights = Path(pretrained).expanduser()
        if weights.is_file():
            return ResolvedSpec(
                f"{arch}:{weights.resolve()}", arch, arch, None, str(weights.resolve()), None
            )
        if os.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin")):
            raise ModelError(f"checkpoint file not found: {pretrained}")
        return ResolvedSpec(spec, arch, arch, pretrained, None, None)
    if os.sep in spec or candidate.suffix:
        raise ModelError(f"model folder not found: {spec}", hint=_offline_hint())
    raise ModelError(
        f"model {spec!r} names no weights",
        hint=f"use ARCH:PRETRAINED (for example {DEFAULT_MODEL}), a checkpoint folder, "
        f"or a bundled model ({', '.join(bundled_models()) or 'none installed'})",
    )


def _local_dir(spec: str, folder: Path) -> ResolvedSpec:
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise ModelError(
            f"{folder}: not a model folder (open_clip_config.json missing)", hint=_offline_hint()
        )
    weights = _weights_in_dir(folder)
    if weights is None:
        raise ModelError(f"{folder}: no weights ({' or '.join(WEIGHT_FILE_NAMES)} missing)")
    try:
        cfg = json.loads(config.read_text())
        arch = str(cfg.get("name") or cfg.get("model_cfg", {}).get("name") or folder.name)
    except (OSError, ValueError) as err:
        raise ModelError(f"{config}: unreadable model config ({err})") from err
    return ResolvedSpec(spec, arch, "local-dir:" + str(folder), None, str(weights), str(folder))


def _hub_weights(arch: str, tag: str) -> tuple[str, dict[str, Any]]:
    """Find the weights of ARCH:TAG in the hub cache, else download them once."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if arch not in open_clip.list_models():
        raise ModelError(f"unknown model architecture {arch!r}")
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelError(
            f"unknown pretrained tag {tag!r} for {arch}",
            hint=f"known tags: {', '.join(tags) or 'none'}",
        )
    if cfg.get("file"):
        return str(cfg["file"]), cfg
    hub = str(cfg.get("hf_hub") or "")
    if not hub:
        raise ModelError(f"{arch}:{tag} has no hub location; pass a checkpoint file instead")
    repo, filename = os.path.split(hub)
    names = [filename] if filename else list(WEIGHT_FILE_NAMES)
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached, cfg
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise ModelError(
            f"model {arch}:{tag} is not in the local hub cache ({repo}) and HF_HUB_OFFLINE is set",
            hint=_offline_hint(),
        )
    _require_hub_reachable(f"{arch}:{tag}", repo)
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for name in names:
        try:
            return hf_hub_download(repo_id=repo, filename=name), cfg
        except Exception as err:  # noqa: BLE001 - reported below as one line
            last = err
    reason = str(last).splitlines()[0] if last else "unknown error"
    raise ModelError(
        f"cannot download model {arch}:{tag} from the Hugging Face hub ({repo}): {reason[:160]}",
        hint=_offline_hint(),
    )


def _require_hub_reachable(name: str, repo: str) -> None:
    """Fail fast, in one line, when the hub cannot be reached (instead of retry storms)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ModelError(
            f"model {name} is not in the local hub cache and {host} cannot be reached "
            f"to download it ({err.strerror or err})",
            hint=_offline_hint(),
        ) from err


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"--device {device}: CUDA is not available here")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ModelError("--device mps: MPS is not available here")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    """True where the CPU runs bf16 matrix maths natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(device: str, precision: str = "auto") -> str:
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    if device == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


@contextmanager
def _no_random_init(weights_file: str | None) -> Iterator[None]:
    """While a model whose checkpoint exists is built: parameters are not filled with random
    values (Tensor.uniform_ / normal_, what torch.nn.init uses, leave them as they are). The
    checkpoint then overwrites every one of them: open_clip loads full checkpoints strictly,
    so a parameter it lacks is an error, never left unset. Measured here: 1.2 s of the 1.7 s
    that building ViT-B-32-256 took went to random initialisation."""
    import torch

    if not weights_file or not os.path.isfile(weights_file):
        yield
        return
    saved = torch.Tensor.uniform_, torch.Tensor.normal_
    torch.Tensor.uniform_ = _unchanged  # type: ignore[method-assign, assignment]
    torch.Tensor.normal_ = _unchanged  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.Tensor.uniform_, torch.Tensor.normal_ = saved  # type: ignore[method-assign]


def _unchanged(tensor: Any, *_args: Any, **_kwargs: Any) -> Any:
    return tensor


class OpenClipEncoder:
    """An open_clip model on one device and precision, with numpy in and out."""

    def __init__(self, spec: str | None = None, device: str = "auto", precision: str = "auto"):
        resolved = resolve_spec(spec)
        import torch

        import open_clip

        if os.environ.get("CLIPSEARCH_THREADS"):
            torch.set_num_threads(int(os.environ["CLIPSEARCH_THREADS"]))
        self.device = pick_device(device)
        self.precision = pick_precision(self.device, precision)
        pretrained_cfg: dict[str, Any] = {}
        weights = resolved.weights_file
        if resolved.pretrained is not None:
            weights, pretrained_cfg = _hub_weights(resolved.arch, resolved.pretrained)
        local_cfg: dict[str, Any] = {}
        if resolved.local_dir is not None:
            try:
                local_cfg = json.loads(Path(resolved.local_dir, "open_clip_config.json").read_text())
            except (OSError, ValueError) as err:
                raise ModelError(f"{resolved.local_dir}: unreadable model config ({err})") from err
        try:
            from clipsearch.text_tower import is_sentence_cfg

            if resolved.local_dir is not None and is_sentence_cfg(local_cfg):
                from clipsearch.sentence_tower import load_sentence_clip

                model, tokenizer, _ = load_sentence_clip(Path(resolved.local_dir))
            elif resolved.local_dir is not None:
                with _no_random_init(resolved.weights_file):
                    model = open_clip.create_model(resolved.open_clip_name, device="cpu")
                tokenizer = open_clip.get_tokenizer(resolved.open_clip_name)
            else:
                with _no_random_init(weights):
                    model = open_clip.create_model(resolved.arch, pretrained=weights,
                                                   device="cpu")
                tokenizer = open_clip.get_tokenizer(resolved.arch)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - open_clip raises many kinds
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelError(f"cannot load model {resolved.spec}: {msg[:200]}",
                             hint=_offline_hint()) from err
        model.eval()
        self.weights_file = weights
        try:
            from clipsearch.text_tower import describe_text_tower

            if resolved.local_dir is not None:
                model_cfg = local_cfg.get("model_cfg", local_cfg)
            else:
                model_cfg = open_clip.get_model_config(resolved.arch) or {}
            self.text_tower = describe_text_tower(model, model_cfg)
        except Exception:  # noqa: BLE001 - the numpy text path is an optimisation only
            self.text_tower = None
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]
        self._dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype)
        self.tokenizer = tokenizer
        pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        # A tag's own preprocessing (mean/std/interpolation) wins, as in open_clip.
        pp.update({k: v for k, v in pretrained_cfg.items()
                   if k in ("mean", "std", "interpolation", "size") and v})
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self._mean = np.asarray(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
        self._std = np.asarray(pp.get("std", (0.26862954, 0.26130258, 0.27577711)), np.float32)
        self._resample = (
            Image.Resampling.BILINEAR
            if pp.get("interpolation") == "bilinear"
            else Image.Resampling.BICUBIC
        )
        with torch.inference_mode():
            probe = self.model.encode_text(self._tokens(["a"]))
        dim = int(probe.shape[-1])
        digest = file_digest(weights) if weights and resolved.pretrained is None else None
        if resolved.pretrained is not None:
            key = f"{resolved.arch}:{resolved.pretrained}"
        else:
            key = f"{resolved.arch}@sha256:{digest[:16] if digest else 'none'}"
        self.info = ModelInfo(
            key=key,
            spec=resolved.spec,
            arch=resolved.arch,
            pretrained=resolved.pretrained,
            checkpoint_hash=digest,
            open_clip_version=open_clip.__version__,
            dim=dim,
        )

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @property
    def logit_scale(self) -> float:
        """The learned softmax temperature (CLIP's logit scale, exponentiated)."""
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.exp().item()) if scale is not None else 100.0

    def _tokens(self, texts: list[str]) -> Any:
        return self.tokenizer(texts).to(self.device)

    def token_count(self, text: str) -> int:
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return 0
        return len(encode(text)) + 2  # start and end tokens

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Resize the shortest side to the model's size, centre-crop, normalise: [3, S, S]."""
        return preprocess_image(image, self.image_size, self._mean, self._std, self._resample)

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(device=self.device, dtype=self._dtype)
            out = self.model.encode_image(x, normalize=True)
        return _normalised(out.float().cpu().numpy())

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model.encode_text(self._tokens(texts), normalize=True)
        return _normalised(out.float().cpu().numpy())


def preprocess_image(image: Image.Image, size: int, mean: np.ndarray, std: np.ndarray,
                     resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """open_clip's eval transform (shortest-side resize, centre crop, normalise) in numpy."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = image.resize((nw, nh), resample, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    arr = np.asarray(crop, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class InMemoryEncoder:
    """The Encoder protocol over a model being trained (for validation during training)."""

    def __init__(self, model: Any, tokenizer: Any, preprocess_cfg: dict[str, Any],
                 name: str = "training") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(preprocess_cfg.get("size", 224))
        self._mean = np.asarray(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                                np.float32)
        self._std = np.asarray(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
                               np.float32)
        self.info = ModelInfo(name, name, name, None, None, "", 0)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) + 2 if hasattr(self.tokenizer, "encode") else 0

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess_image(image, self.image_size, self._mean, self._std)

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model.encode_image(torch.from_numpy(batch), normalize=True)
        return _normalised(out.float().numpy())

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model.encode_text(self.tokenizer(texts), normalize=True)
        return _normalised(out.float().numpy())


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def load_encoder(spec: str | None, device: str = "auto", precision: str = "auto") -> Encoder:
    """Load the model a spec names (see resolve_spec); raises ModelError with a hint."""
    return OpenClipEncoder(spec, device=device, precision=precision)
