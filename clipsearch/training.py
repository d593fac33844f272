"""Contrastive (CLIP-objective) training of small open_clip models on an image folder + captions."""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.text_tower import is_sentence_cfg

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch
    from open_clip.model import CLIP
    from PIL import Image

WHITE_RGB = (255, 255, 255)
CHECKPOINT_CONFIG_NAME = "open_clip_config.json"
CHECKPOINT_WEIGHTS_NAME = "open_clip_model.safetensors"
CHECKPOINT_CARD_NAME = "clipsearch_model.json"
RESUME_FILE_NAME = "resume.pt"
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)

StepCallback = Callable[[int, int, float, float], None]
"""on_step(step, total_steps, loss, pairs_per_s)."""

AugmentFn = Callable[["Image.Image", random.Random], "Image.Image"]
"""augment(rgba_image, rng) -> RGB image; must draw randomness only from rng."""


class TrainingError(Exception):
    """Bad training input (missing files, unreadable captions, impossible batch size)."""


@dataclass(frozen=True)
class CaptionedImage:
    """One training image (path relative to the image folder) with all of its captions."""

    path: str
    captions: tuple[str, ...]
    groups: frozenset[str] = frozenset()
    """Images sharing a group never share a batch (defaults to the path itself)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (same config + data + seed = same model)."""

    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    freeze_image_tower: bool = False
    freeze_text_tower: bool = False
    bf16_autocast: bool = True
    max_logit_scale: float = 100.0
    checkpoint_every_steps: int = 0
    """Write the resume file every N steps (0: only at the end)."""


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run reports."""

    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- data


def read_caption_rows(captions_path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV (with a header) or JSON-lines captions file, as dicts.

    Raises OSError or ValueError; callers name the file in their own error."""
    if captions_path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with captions_path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with captions_path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if not {"path", "caption"} <= set(header):
            raise ValueError("its first row must be a header naming the columns, at least "
                             f"path and caption (it is: {','.join(header)[:80]})")
        return list(reader)


def read_captions(captions_path: Path) -> list[CaptionedImage]:
    """Read a CSV (header path,caption[,group]) or JSON-lines captions file, grouped by image.

    An optional ``group`` field (several joined by "|") names concepts an image shows, so that
    two images showing the same thing never land in one batch as each other's negatives.
    """
    try:
        rows = read_caption_rows(captions_path)
    except (OSError, ValueError) as err:
        raise TrainingError(f"cannot read captions file {captions_path}: {err}") from err
    captions: dict[str, list[str]] = {}
    groups: dict[str, set[str]] = {}
    for row in rows:
        if "path" not in row or "caption" not in row:
            raise TrainingError(f"{captions_path}: every row needs 'path' and 'caption'")
        path, caption = str(row["path"]), str(row["caption"]).strip()
        if caption and caption not in captions.setdefault(path, []):
            captions[path].append(caption)
        group = row.get("group")
        group_set = groups.setdefault(path, set())
        if group:
            group_set.update(g for g in str(group).split("|") if g)
    return [
        CaptionedImage(p, tuple(c), frozenset(groups[p] or {p}))
        for p, c in sorted(captions.items())
        if c
    ]


def composite_rgba(image: Image.Image, background: tuple[int, int, int] = WHITE_RGB) -> Image.Image:
    """Return an RGB image with any transparency composited onto a solid background.

    Transparent pixels of emoji art carry leftover colour, so dropping alpha is not enough.
    """
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def plan_batches(
    images: Sequence[CaptionedImage], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Deterministic batches for one epoch: a seeded shuffle, no shared group within a batch.

    Items that would clash are deferred to a later batch; only full batches are returned.
    """
    order = list(range(len(images)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    batches: list[list[int]] = []
    pending = order
    while len(pending) >= batch_size:
        batch: list[int] = []
        used: set[str] = set()
        deferred: list[int] = []
        for position, index in enumerate(pending):
            if len(batch) == batch_size:
                deferred.extend(pending[position:])
                break
            item_groups = images[index].groups
            if used.isdisjoint(item_groups):
                batch.append(index)
                used.update(item_groups)
            else:
                deferred.append(index)
        if len(batch) < batch_size:
            break
        batches.append(batch)
        pending = deferred
    return batches


def iterate_batches(
    images: Sequence[CaptionedImage], batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """Yield (step, image indices) forever from ``start_step``, epoch after epoch."""
    step = 0
    epoch = 0
    while True:
        batches = plan_batches(images, batch_size, seed, epoch)
        if not batches:
            raise TrainingError(
                f"cannot form a batch of {batch_size} distinct images from {len(images)} images"
            )
        for batch in batches:
            if step >= start_step:
                yield step, batch
            step += 1
        epoch += 1


# --------------------------------------------------------------------------- model


def create_model_from_config(model_cfg: dict[str, Any], seed: int = 0) -> CLIP:
    """Build a freshly initialised model (open_clip CLIP, or SentenceCLIP) from a config."""
    import torch
    from open_clip.model import CLIP

    if is_sentence_cfg(model_cfg):
        from clipsearch.sentence_tower import create_sentence_clip, load_pretrained_trunk

        model = create_sentence_clip(model_cfg, seed)
        trunk = model_cfg["text_cfg"].get("trunk_weights")
        if trunk:
            load_pretrained_trunk(model, trunk)
        return model  # type: ignore[return-value]
    torch.manual_seed(seed)
    return CLIP(**model_cfg)


def make_tokenizer(model_cfg: dict[str, Any], model_dir: Path | None = None) -> Any:
    """The tokenizer a config needs: open_clip's BPE, or the sentence encoder's word pieces."""
    context_length = int(model_cfg["text_cfg"].get("context_length", 77))
    if is_sentence_cfg(model_cfg):
        from clipsearch.sentence_tower import TOKENIZER_FILE_NAME, WordPieceTokenizer

        source = model_cfg["text_cfg"].get("tokenizer_file") or (
            model_dir / TOKENIZER_FILE_NAME if model_dir else None)
        if source is None:
            raise TrainingError("a sentence text tower needs text_cfg.tokenizer_file")
        return WordPieceTokenizer(source, context_length)
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def load_checkpoint(checkpoint_dir: Path) -> tuple[CLIP, dict[str, Any]]:
    """Load a checkpoint folder written by save_checkpoint; return (fp32 model, config json)."""
    import open_clip
    from open_clip.model import CLIP

    config = json.loads((checkpoint_dir / CHECKPOINT_CONFIG_NAME).read_text(encoding="utf-8"))
    if is_sentence_cfg(config):
        from clipsearch.sentence_tower import load_sentence_clip

        sentence_model, _, _ = load_sentence_clip(checkpoint_dir)
        return sentence_model.float().eval(), config  # type: ignore[return-value]
    model = open_clip.create_model("local-dir:" + str(checkpoint_dir), device="cpu")
    if not isinstance(model, CLIP):
        raise TrainingError(f"{checkpoint_dir} does not hold a plain open_clip CLIP model")
    return model.float().eval(), config


def make_preprocess_cfg(image_size: int) -> dict[str, Any]:
    """The preprocess block of open_clip_config.json used for every model trained here."""
    return {
        "size": image_size,
        "mean": list(DEFAULT_MEAN),
        "std": list(DEFAULT_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def make_image_transform(preprocess_cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The open_clip eval transform described by preprocess_cfg (RGB PIL image -> tensor)."""
    import open_clip

    return open_clip.image_transform(  # type: ignore[no-any-return]
        preprocess_cfg["size"],
        is_train=False,
        mean=tuple(preprocess_cfg["mean"]),
        std=tuple(preprocess_cfg["std"]),
        resize_mode=preprocess_cfg["resize_mode"],
        interpolation=preprocess_cfg["interpolation"],
    )


def save_checkpoint(
    model: CLIP,
    model_cfg: dict[str, Any],
    checkpoint_dir: Path,
    card: dict[str, Any] | None = None,
    half: bool = True,
) -> Path:
    """Write a folder that ``open_clip.create_model_and_transforms("local-dir:...")`` loads.

    Weights go to open_clip_model.safetensors (fp16 when ``half``), the architecture and
    preprocessing to open_clip_config.json, and ``card`` (name, trained_on, licence notes,
    metrics) to clipsearch_model.json.
    """
    import torch
    from safetensors.torch import save_file

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    image_size = int(model_cfg["vision_cfg"]["image_size"])
    config = {"model_cfg": model_cfg, "preprocess_cfg": make_preprocess_cfg(image_size)}
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    weights_tmp = checkpoint_dir / (CHECKPOINT_WEIGHTS_NAME + ".tmp")
    save_file(state, str(weights_tmp))
    weights_tmp.chmod(0o644)
    weights_tmp.replace(checkpoint_dir / CHECKPOINT_WEIGHTS_NAME)
    if is_sentence_cfg(model_cfg):
        import shutil

        from clipsearch.sentence_tower import TOKENIZER_FILE_NAME

        text_cfg = dict(model_cfg["text_cfg"])
        text_cfg.pop("trunk_weights", None)  # the weights file now holds the trunk
        source = text_cfg.pop("tokenizer_file", None)
        target = checkpoint_dir / TOKENIZER_FILE_NAME
        if source and Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
        config["model_cfg"] = {**model_cfg, "text_cfg": text_cfg}
    (checkpoint_dir / CHECKPOINT_CONFIG_NAME).write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )
    if card is not None:
        (checkpoint_dir / CHECKPOINT_CARD_NAME).write_text(
            json.dumps(card, indent=2) + "\n", encoding="utf-8"
        )
    return checkpoint_dir


def round_to_half(model: CLIP) -> CLIP:
    """A copy of the model whose weights went through fp16, as a shipped checkpoint has them."""
    import copy

    import torch

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in list(clone.parameters()) + list(clone.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return clone.eval()


# --------------------------------------------------------------------------- training


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric cross-entropy over scaled cosine similarities; row i matches column i."""
    import torch
    import torch.nn.functional as F

    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp() * image_features @ text_features.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def _freeze_towers(model: CLIP, config: TrainConfig) -> None:
    """Lock a tower (LiT); a sentence tower's newly made projection, if any, still learns."""
    for name, parameter in model.named_parameters():
        is_image = name.startswith("visual.")
        is_text = not is_image and name not in ("logit_scale", "logit_bias")
        if name.startswith("text.proj."):
            is_text = False
        if (is_image and config.freeze_image_tower) or (is_text and config.freeze_text_tower):
            parameter.requires_grad_(False)


def train_model(
    model: CLIP,
    model_cfg: dict[str, Any],
    image_dir: Path,
    images: Sequence[CaptionedImage],
    config: TrainConfig,
    augment: AugmentFn | None = None,
    resume_path: Path | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place with the CLIP objective for ``config.steps`` steps.

    Batch order, caption choice and augmentation are derived from (seed, step, image), so a
    run stopped and resumed from ``resume_path`` ends with the same weights as one that was
    not. The resume file holds model, optimizer and step; it is written atomically.
    """
    import torch
    from PIL import Image

    if config.steps < 1 or config.batch_size < 2:
        raise TrainingError(f"need steps >= 1 and a batch size >= 2 (a batch's other pairs are "
                            f"the negatives); got {config.steps} and {config.batch_size}")
    if len(images) < config.batch_size:
        raise TrainingError(f"need at least {config.batch_size} images for --batch-size "
                            f"{config.batch_size}, got {len(images)}")
    torch.manual_seed(config.seed)
    tokenizer = make_tokenizer(model_cfg)
    transform = make_image_transform(
        make_preprocess_cfg(int(model_cfg["vision_cfg"]["image_size"]))
    )
    pixels: dict[str, Image.Image] = {}
    for item in images:
        try:
            with Image.open(image_dir / item.path) as opened:
                opened.load()
                pixels[item.path] = opened.convert("RGBA")
        except OSError as err:
            raise TrainingError(f"cannot read training image {item.path}: {err}") from err

    _freeze_towers(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    start_step = 0
    loss_value = float("nan")
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if state.get("config") != asdict(config):
            raise TrainingError(f"{resume_path} was written by a run with a different config")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        loss_value = float(state.get("loss", float("nan")))

    def save_resume(step: int) -> None:
        if resume_path is None:
            return
        tmp = resume_path.with_name(resume_path.name + ".tmp")
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "config": asdict(config),
            "loss": loss_value,
        }
        torch.save(state, tmp)
        tmp.replace(resume_path)

    # A locked sentence-encoder trunk gives each caption one fixed vector: compute it once.
    sentence_cache: dict[str, torch.Tensor] = {}
    if config.freeze_text_tower and hasattr(getattr(model, "text", None), "project"):
        unique = sorted({c for item in images for c in item.captions})
        model.text.eval()
        with torch.no_grad():
            for start in range(0, len(unique), 512):
                chunk = unique[start : start + 512]
                for caption, vector in zip(chunk, model.text.bert(tokenizer(chunk))):
                    sentence_cache[caption] = vector

    model.train()
    if sentence_cache:
        model.text.eval()
    losses: list[float] = []
    started = time.perf_counter()
    for step, batch in iterate_batches(images, config.batch_size, config.seed, start_step):
        if step >= config.steps:
            break
        step_started = time.perf_counter()
        image_tensors = []
        texts = []
        for index in batch:
            item = images[index]
            rng = random.Random(f"{config.seed}:{step}:{item.path}")
            texts.append(item.captions[rng.randrange(len(item.captions))])
            rgba = pixels[item.path]
            rgb = augment(rgba, rng) if augment is not None else composite_rgba(rgba)
            image_tensors.append(transform(rgb))
        image_batch = torch.stack(image_tensors)
        text_batch = None if sentence_cache else tokenizer(texts)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
            image_features = model.encode_image(image_batch)
            if sentence_cache:
                text_features = model.text.project(torch.stack([sentence_cache[t]
                                                                for t in texts]))
            else:
                text_features = model.encode_text(text_batch)
        loss = clip_loss(image_features, text_features, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(config.max_logit_scale))
        loss_value = float(loss.detach())
        losses.append(loss_value)
        done = step + 1
        if config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0:
            save_resume(done)
        if on_step is not None:
            elapsed = time.perf_counter() - step_started
            on_step(done, config.steps, loss_value, len(batch) / max(elapsed, 1e-9))
    save_resume(max(config.steps, start_step))
    model.eval()
    return TrainResult(
        steps=config.steps,
        final_loss=loss_value,
        losses=losses,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- inference


def encode_image_files(
    model: CLIP,
    preprocess_cfg: dict[str, Any],
    paths: Sequence[Path],
    background: tuple[int, int, int] = WHITE_RGB,
    batch_size: int = 256,
) -> torch.Tensor:
    """L2-normalised embeddings of image files (transparency composited onto background)."""
    import torch
    from PIL import Image

    transform = make_image_transform(preprocess_cfg)
    chunks = []
    for start in range(0, len(paths), batch_size):
        tensors = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as opened:
                tensors.append(transform(composite_rgba(opened, background)))
        with torch.no_grad():
            chunks.append(model.encode_image(torch.stack(tensors), normalize=True).float())
    return torch.cat(chunks)


def encode_texts(
    model: CLIP, context_length: int, texts: Sequence[str], batch_size: int = 512,
    tokenizer: Any = None,
) -> torch.Tensor:
    """L2-normalised embeddings of texts (open_clip's BPE tokenizer unless one is given)."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = tokenizer or SimpleTokenizer(context_length=context_length)
    chunks = []
    for start in range(0, len(texts), batch_size):
        with torch.no_grad():
            tokens = tokenizer(list(texts[start : start + batch_size]))
            chunks.append(model.encode_text(tokens, normalize=True).float())
    return torch.cat(chunks)


# --------------------------------------------------------------------------- orchestration

SMALL_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4,
                   "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3,
                 "layers": 4},
}
"""The architecture of the bundled emoji-mini model (13 M parameters)."""

ValidateCallback = Callable[[int, dict[str, Any]], None]
"""on_validate(step, metrics) with the metrics of clipsearch.evaluation.evaluate."""


def run_training(
    image_dir: Path,
    captions: Path,
    out_dir: Path,
    config: TrainConfig,
    model_cfg: dict[str, Any] | None = None,
    init_checkpoint: Path | None = None,
    val_dir: Path | None = None,
    val_captions: Path | None = None,
    val_every: int = 0,
    on_step: StepCallback | None = None,
    on_validate: ValidateCallback | None = None,
    card: dict[str, Any] | None = None,
) -> tuple[TrainResult, dict[str, Any] | None]:
    """Train from a config (from scratch) or a checkpoint (fine-tune), validate every
    `val_every` steps on a labelled folder, save an fp16 checkpoint folder `--model` loads.
    Resumable: the resume file lives in out_dir. Returns (result, final validation metrics)."""
    from clipsearch.encoder import InMemoryEncoder

    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"{out_dir}: --out is a file, not a folder")
    images = read_captions(captions)
    if not images:
        raise TrainingError(f"{captions}: no captioned images")
    missing = [i.path for i in images if not (image_dir / i.path).is_file()]
    if missing:
        raise TrainingError(f"{image_dir / missing[0]}: listed in {captions} but missing "
                            f"({len(missing)} missing in all)")
    if init_checkpoint is not None:
        if not (init_checkpoint / CHECKPOINT_CONFIG_NAME).is_file():
            raise TrainingError(f"{init_checkpoint}: not a checkpoint folder "
                                f"({CHECKPOINT_CONFIG_NAME} missing)")
        model, cfg_json = load_checkpoint(init_checkpoint)
        model_cfg = cfg_json.get("model_cfg", cfg_json)
        if is_sentence_cfg(model_cfg):
            from clipsearch.sentence_tower import TOKENIZER_FILE_NAME

            model_cfg = {**model_cfg, "text_cfg": {
                **model_cfg["text_cfg"],
                "tokenizer_file": str(init_checkpoint / TOKENIZER_FILE_NAME)}}
        preprocess_cfg = cfg_json.get("preprocess_cfg") or make_preprocess_cfg(
            int(model_cfg["vision_cfg"]["image_size"]))
    else:
        model_cfg = model_cfg or SMALL_MODEL_CFG
        model = create_model_from_config(model_cfg, seed=config.seed)
        preprocess_cfg = make_preprocess_cfg(int(model_cfg["vision_cfg"]["image_size"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(model_cfg)
    val_items = None
    if val_dir is not None and val_captions is not None:
        from clipsearch.evaluation import read_labelled

        val_items = read_labelled(val_captions)
    last_metrics: dict[str, Any] | None = None

    def validate(step: int) -> None:
        nonlocal last_metrics
        if val_items is None or val_dir is None:
            return
        from clipsearch.evaluation import evaluate

        was_training = model.training
        model.eval()
        try:
            report = evaluate(InMemoryEncoder(model, tokenizer, preprocess_cfg), val_dir,
                              val_items)
        finally:
            model.train(was_training)
        last_metrics = report.metrics
        if on_validate is not None:
            on_validate(step, report.metrics)

    def step_hook(step: int, total: int, loss: float, pairs_per_s: float) -> None:
        if on_step is not None:
            on_step(step, total, loss, pairs_per_s)
        if val_every and step % val_every == 0 and step < total:
            validate(step)

    result = train_model(model, model_cfg, image_dir, images, config,
                         resume_path=out_dir / RESUME_FILE_NAME, on_step=step_hook)
    validate(result.steps)
    full_card = dict(card or {})
    full_card.setdefault("training", {
        "steps": result.steps, "final_loss": result.final_loss,
        "config": asdict(config), "captions": str(captions),
    })
    if last_metrics is not None:
        full_card["validation"] = last_metrics
    save_checkpoint(model, model_cfg, out_dir, card=full_card, half=True)
    return result, last_metrics
