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
PERMISSIVE_STYLES = ("google", "twitter", "fluent-flat", "fluent-color", "fluent-3d")
"""Noto (Apache-2.0), Twemoji (CC-BY-4.0), Fluent (MIT): may be trained on and shipped."""
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


FLUENT_PACKAGES: dict[str, str] = {
    "fluent-flat": "@iconify-json/fluent-emoji-flat@1.2.6",
    "fluent-color": "@iconify-json/fluent-emoji@1.2.7",
    "fluent-3d": "@lobehub/fluent-emoji-3d@1.1.0",
}
"""Microsoft's Fluent Emoji (MIT) in three styles; rendered to 64 px PNGs before use."""
RENDER_SIZE_PX = 64


def _package_spec(style: str) -> str:
    return FLUENT_PACKAGES.get(style) or f"emoji-datasource-{style}@{EMOJI_DATASOURCE_VERSION}"


def _package_dir(node_modules: Path, style: str) -> Path:
    return node_modules / _package_spec(style).rsplit("@", 1)[0]


def install_emoji_datasource(cache_dir: Path, styles: tuple[str, ...]) -> Path:
    """npm-install the art of every style (plus Google's emoji.json) into cache_dir; render
    the Fluent styles to PNG; return node_modules."""
    node_modules = cache_dir / "node_modules"
    wanted = tuple(dict.fromkeys(("google", *styles)))
    missing = [s for s in wanted if not _package_dir(node_modules, s).is_dir()]
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(cache_dir), "--no-audit", "--no-fund",
             *[_package_spec(s) for s in missing]],
            check=True,
        )
    for style in wanted:
        if style in FLUENT_PACKAGES:
            render_fluent_style(node_modules, style)
    return node_modules


def style_image_dir(node_modules: Path, style: str) -> Path:
    """Folder holding the 64 px PNGs of one style."""
    if style in FLUENT_PACKAGES:
        return node_modules.parent / "rendered" / style
    return node_modules / f"emoji-datasource-{style}" / "img" / style / "64"


def _codepoint_keys(entry: dict[str, object]) -> list[str]:
    keys = [str(entry["unified"]).lower()]
    if entry.get("non_qualified"):
        keys.append(str(entry["non_qualified"]).lower())
    keys.append(keys[0].replace("-fe0f", ""))
    return list(dict.fromkeys(keys))


def render_fluent_style(node_modules: Path, style: str) -> Path:
    """Write <unified>.png (64 px RGBA) for every base emoji the Fluent package draws."""
    out = style_image_dir(node_modules, style)
    done = out / ".complete"
    if done.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    entries = json.loads((_package_dir(node_modules, "google") / "emoji.json").read_text("utf-8"))
    package = _package_dir(node_modules, style)
    if style == "fluent-3d":
        for entry in entries:
            for key in _codepoint_keys(entry):
                source = package / "assets" / f"{key}.webp"
                if source.is_file():
                    with Image.open(source) as opened:
                        small = opened.convert("RGBA").resize(
                            (RENDER_SIZE_PX, RENDER_SIZE_PX), Image.Resampling.LANCZOS)
                    small.save(out / f"{str(entry['unified']).lower()}.png")
                    break
    else:
        import resvg_py

        chars = json.loads((_package_dir(node_modules, "fluent-flat") / "chars.json")
                           .read_text("utf-8"))
        icon_set = json.loads((package / "icons.json").read_text("utf-8"))
        icons = icon_set["icons"]
        for entry in entries:
            name = next((chars[k] for k in _codepoint_keys(entry) if k in chars), None)
            icon = icons.get(name) if name else None
            if icon is None:
                continue
            w, h = icon.get("width", icon_set.get("width", 16)), icon.get(
                "height", icon_set.get("height", 16))
            svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                   f'viewBox="0 0 {w} {h}">{icon["body"]}</svg>')
            png = resvg_py.svg_to_bytes(svg_string=svg, width=RENDER_SIZE_PX,
                                        height=RENDER_SIZE_PX)
            (out / f"{str(entry['unified']).lower()}.png").write_bytes(bytes(png))
    done.write_text("ok\n")
    return out


def read_emoji(node_modules: Path, style: str) -> list[Emoji]:
    """Base emoji that have an image in ``style``, in emoji.json sort order."""
    catalogue_style = "google" if style in FLUENT_PACKAGES else style
    entries = json.loads(
        (_package_dir(node_modules, catalogue_style) / "emoji.json").read_text(encoding="utf-8")
    )
    entries.sort(key=lambda e: e["sort_order"])
    image_dir = style_image_dir(node_modules, style)

    def image_of(e: dict[str, object]) -> str:
        return f"{str(e['unified']).lower()}.png" if style in FLUENT_PACKAGES else str(e["image"])

    return [
        Emoji(
            unified=e["unified"],
            name=e["name"].lower(),
            short_names=tuple(e["short_names"]),
            category=e["category"],
            subcategory=e["subcategory"],
            image=image_of(e),
        )
        for e in entries
        if (style in FLUENT_PACKAGES or e.get(f"has_img_{style}"))
        and (image_dir / image_of(e)).is_file()
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
