"""Emoji art from npm (emoji-datasource-*): catalogue, captions, compositions, augmentation."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance

EMOJI_DATASOURCE_VERSION = "16.0.0"
PERMISSIVE_STYLES = ("google", "twitter")
"""Noto (Apache-2.0) and Twemoji (CC-BY-4.0): may be trained on and shipped."""
EVALUATION_ONLY_STYLES = ("apple", "facebook")
"""Not licensed for redistribution: used only to measure, never trained on or committed."""

# Plain words for each subcategory, used in captions ("fruit", "vehicle", ...).
SUBCATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "food-fruit": ("fruit",),
    "food-vegetable": ("vegetable",),
    "food-prepared": ("food", "meal"),
    "food-asian": ("asian food",),
    "food-sweet": ("dessert", "sweets"),
    "food-marine": ("seafood",),
    "drink": ("drink",),
    "dishware": ("dishware", "kitchen"),
    "animal-mammal": ("mammal", "animal"),
    "animal-bird": ("bird", "animal"),
    "animal-amphibian": ("amphibian", "animal"),
    "animal-reptile": ("reptile", "animal"),
    "animal-marine": ("sea animal",),
    "animal-bug": ("insect", "bug"),
    "plant-flower": ("flower",),
    "plant-other": ("plant",),
    "cat-face": ("cat face",),
    "monkey-face": ("monkey face",),
    "transport-ground": ("vehicle",),
    "transport-water": ("boat",),
    "transport-air": ("aircraft",),
    "transport-sign": ("traffic sign",),
    "sky & weather": ("weather", "sky"),
    "country-flag": ("flag", "country flag"),
    "subdivision-flag": ("flag",),
    "flag": ("flag",),
    "musical-instrument": ("musical instrument",),
    "music": ("music",),
    "sport": ("sport",),
    "game": ("game",),
    "event": ("celebration",),
    "award-medal": ("medal", "award"),
    "clothing": ("clothing",),
    "heart": ("heart",),
    "emotion": ("emotion",),
    "zodiac": ("zodiac sign",),
    "time": ("clock", "time"),
    "place-building": ("building",),
    "place-religious": ("religious building",),
    "place-geographic": ("landscape",),
    "place-map": ("map",),
    "arrow": ("arrow",),
    "money": ("money",),
    "tool": ("tool",),
    "office": ("office",),
    "book-paper": ("book", "paper"),
    "computer": ("computer",),
    "phone": ("phone",),
    "mail": ("mail",),
    "light & video": ("light", "video"),
    "medical": ("medical",),
    "science": ("science",),
    "household": ("household",),
    "lock": ("lock",),
    "writing": ("writing",),
    "keycap": ("keycap", "number"),
    "alphanum": ("letters", "symbol"),
    "geometric": ("shape", "geometric"),
    "face-smiling": ("smiling face",),
    "face-affection": ("loving face",),
    "face-tongue": ("face with tongue",),
    "face-hand": ("face with hand",),
    "face-neutral-skeptical": ("neutral face",),
    "face-sleepy": ("sleepy face",),
    "face-unwell": ("sick face",),
    "face-hat": ("face with hat",),
    "face-glasses": ("face with glasses",),
    "face-concerned": ("worried face",),
    "face-negative": ("angry face",),
    "face-costume": ("costume face",),
    "hand-fingers-open": ("hand",),
    "hand-fingers-partial": ("hand",),
    "hand-single-finger": ("hand", "pointing finger"),
    "hand-fingers-closed": ("hand", "fist"),
    "hands": ("hands",),
    "hand-prop": ("hand",),
    "body-parts": ("body part",),
    "person": ("person",),
    "person-gesture": ("person gesture",),
    "person-role": ("person", "job"),
    "person-fantasy": ("fantasy person",),
    "person-activity": ("person activity",),
    "person-sport": ("athlete", "sport"),
    "person-resting": ("person resting",),
    "family": ("family", "couple"),
    "person-symbol": ("person symbol",),
    "religion": ("religion",),
    "warning": ("warning",),
    "av-symbol": ("media symbol",),
    "gender": ("gender",),
    "math": ("math",),
    "punctuation": ("punctuation",),
    "currency": ("currency", "money"),
    "other-symbol": ("symbol",),
    "sound": ("sound",),
    "other-object": ("object",),
    "arts & crafts": ("arts and crafts",),
    "hotel": ("hotel",),
    "skin-tone": ("skin tone",),
}

# Plain-word category queries for precision@10, judged by subcategory.
CATEGORY_QUERIES: dict[str, frozenset[str]] = {
    "fruit": frozenset({"food-fruit"}),
    "vegetable": frozenset({"food-vegetable"}),
    "vehicle": frozenset({"transport-ground"}),
    "flag": frozenset({"country-flag", "subdivision-flag", "flag"}),
    "weather": frozenset({"sky & weather"}),
    "musical instrument": frozenset({"musical-instrument"}),
    "bird": frozenset({"animal-bird"}),
    "insect": frozenset({"animal-bug"}),
    "flower": frozenset({"plant-flower"}),
    "clothing": frozenset({"clothing"}),
    "heart": frozenset({"heart"}),
    "clock": frozenset({"time"}),
    "building": frozenset({"place-building"}),
    "arrow": frozenset({"arrow"}),
    "drink": frozenset({"drink"}),
    "sport": frozenset({"sport"}),
    "tool": frozenset({"tool"}),
    "sea animal": frozenset({"animal-marine"}),
    "aircraft": frozenset({"transport-air"}),
    "boat": frozenset({"transport-water"}),
    "zodiac sign": frozenset({"zodiac"}),
    "dessert": frozenset({"food-sweet"}),
    "mammal": frozenset({"animal-mammal"}),
    "smiling face": frozenset({"face-smiling"}),
    "money": frozenset({"money", "currency"}),
    "computer": frozenset({"computer"}),
    "game": frozenset({"game"}),
    "medal": frozenset({"award-medal"}),
}


@dataclass(frozen=True)
class Emoji:
    """One base emoji (no skin-tone variants) as listed in emoji.json."""

    unified: str
    name: str
    short_names: tuple[str, ...]
    category: str
    subcategory: str
    image: str


def install_emoji_datasource(cache_dir: Path, styles: tuple[str, ...]) -> Path:
    """npm-install the emoji-datasource packages into cache_dir; return node_modules."""
    node_modules = cache_dir / "node_modules"
    missing = [s for s in styles if not (node_modules / f"emoji-datasource-{s}").is_dir()]
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        specs = [f"emoji-datasource-{s}@{EMOJI_DATASOURCE_VERSION}" for s in missing]
        subprocess.run(
            ["npm", "install", "--prefix", str(cache_dir), "--no-audit", "--no-fund", *specs],
            check=True,
        )
    return node_modules


def style_image_dir(node_modules: Path, style: str) -> Path:
    """Folder holding the 64 px PNGs of one style."""
    return node_modules / f"emoji-datasource-{style}" / "img" / style / "64"


def read_emoji(node_modules: Path, style: str) -> list[Emoji]:
    """Base emoji that have an image in ``style``, in emoji.json sort order."""
    entries = json.loads(
        (node_modules / f"emoji-datasource-{style}" / "emoji.json").read_text(encoding="utf-8")
    )
    entries.sort(key=lambda e: e["sort_order"])
    image_dir = style_image_dir(node_modules, style)
    return [
        Emoji(
            unified=e["unified"],
            name=e["name"].lower(),
            short_names=tuple(e["short_names"]),
            category=e["category"],
            subcategory=e["subcategory"],
            image=e["image"],
        )
        for e in entries
        if e.get(f"has_img_{style}") and (image_dir / e["image"]).is_file()
    ]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def captions_for(emoji: Emoji) -> list[str]:
    """Name, short names, 'an emoji of ...', and plain subcategory/category words."""
    words = SUBCATEGORY_WORDS.get(
        emoji.subcategory, (emoji.subcategory.replace("-", " ").replace("&", "and"),)
    )
    captions = [emoji.name, f"an emoji of {_article(emoji.name)}", f"{emoji.name}, {words[0]}"]
    for short in emoji.short_names:
        phrase = short.replace("_", " ").replace("-", " ")
        if phrase != emoji.name and not phrase[-1:].isdigit():
            captions.append(phrase)
    captions.extend(words)
    captions.append(f"{_article(words[0])} emoji")
    captions.append(emoji.category.lower().replace("&", "and"))
    return list(dict.fromkeys(captions))


def write_training_set(
    node_modules: Path, styles: tuple[str, ...], out_dir: Path, compositions: int, seed: int
) -> Path:
    """Write captions.csv (path,caption,group) in out_dir, image paths relative to out_dir.

    Single emoji reference the npm PNGs; compositions of two emoji side by side are rendered
    into out_dir/compositions. The group column names the emoji shown, so an emoji and a
    composition holding it (or the same emoji in two styles) never share a batch.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    for style in styles:
        for emoji in read_emoji(node_modules, style):
            path = style_image_dir(node_modules, style) / emoji.image
            for caption in captions_for(emoji):
                rows.append((os.path.relpath(path, out_dir), caption, emoji.unified))
    rng = random.Random(seed)
    composition_dir = out_dir / "compositions"
    composition_dir.mkdir(exist_ok=True)
    pool = [
        (style, e)
        for style in styles
        for e in read_emoji(node_modules, style)
        if e.category not in ("Flags", "Symbols", "People & Body")
    ]
    for index in range(compositions):
        (style_a, a), (style_b, b) = rng.sample(pool, 2)
        if a.unified == b.unified:
            continue
        canvas = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        for slot, (style, emoji) in enumerate(((style_a, a), (style_b, b))):
            with Image.open(style_image_dir(node_modules, style) / emoji.image) as opened:
                small = opened.convert("RGBA").resize((32, 32), Image.Resampling.LANCZOS)
            canvas.alpha_composite(small, (slot * 32, 16))
        name = f"{index:05d}.png"
        canvas.save(composition_dir / name)
        for caption in (
            f"{_article(a.name)} and {_article(b.name)}",
            f"{a.name} and {b.name}",
            f"{a.name}, {b.name}",
        ):
            rows.append((f"compositions/{name}", caption, f"{a.unified}|{b.unified}"))
    captions_path = out_dir / "captions.csv"
    with captions_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "group"])
        writer.writerows(rows)
    return captions_path


def augment_emoji(image: Image.Image, rng: random.Random) -> Image.Image:
    """Random scale/offset, background colour and mild brightness/contrast; no flips, no hue."""
    size = image.size[0]
    scale = rng.uniform(0.6, 1.15)
    side = max(8, round(size * scale))
    resized = image.resize((side, side), Image.Resampling.BICUBIC)
    roll = rng.random()
    if roll < 0.55:
        background = (255, 255, 255)
    elif roll < 0.8:
        background = (rng.randint(170, 255), rng.randint(170, 255), rng.randint(170, 255))
    else:
        background = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
    canvas = Image.new("RGBA", (size, size), (*background, 255))
    slack = size - side
    if slack >= 0:
        offset = (rng.randint(0, slack), rng.randint(0, slack))
    else:
        offset = (rng.randint(slack, 0), rng.randint(slack, 0))
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    layer.paste(resized, offset)
    canvas.alpha_composite(layer)
    rgb = canvas.convert("RGB")
    rgb = ImageEnhance.Brightness(rgb).enhance(rng.uniform(0.9, 1.1))
    return ImageEnhance.Contrast(rgb).enhance(rng.uniform(0.9, 1.1))
