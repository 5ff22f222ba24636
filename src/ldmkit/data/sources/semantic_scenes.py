"""Semantic scenes: real RGBA cut-outs pasted on procedural backgrounds, with their class map.

The semantic-map-to-image task of the LDM paper (Rombach et al. 2022, Sec. 4.3.2, trained there
on landscapes with segmentation maps), at a size that fits a CPU. Each of the K-1 object classes
is one cut-out (a Tux Paint stamp, an emoji, or a PNG from a folder), chosen from the seed; class
0 is the background. A scene pastes 1..``max_objects`` cut-outs with hard alpha (>= 128), lowest
on the canvas in front, so the map is exactly the union of the pasted alpha masks.

Scene ``i`` of a split depends only on (seed, split, i): ``limit`` or sharding never changes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldmkit.config_checks import Integer
from ldmkit.data.errors import DataError, SourceNotFoundError
from ldmkit.data.sources.base import Source, SourceSample

ALPHA_THRESHOLD = 128
SPLIT_CODES = {"train": 0, "val": 1}
MAX_CUTOUT_SIDE = 256  # larger stamps are shrunk once; scenes are far smaller


@dataclass
class Cutout:
    name: str
    category: str
    image: Image.Image  # RGBA, cropped to its alpha box


@dataclass(frozen=True)
class Candidate:
    name: str
    category: str
    load: Callable[[], Image.Image]


def short_name(caption: str) -> str:
    """ "A frog." -> "frog", "Earth. Our planet!" -> "earth", 'A "Fuji" apple.' -> "fuji
    apple" (scene captions list these)."""
    text = re.split(r"[.!?](?=\s+[A-Z]|\s*$)", caption.strip())[0]
    text = re.sub("[\"\u201c\u201d]", "", text).strip(" !?'\u2018\u2019")
    text = re.sub(r"^(a|an|the)\s+", "", text, flags=re.IGNORECASE)
    return text.lower() or caption


def _tuxpaint_candidates(path: str | None) -> list[Candidate]:
    from ldmkit.data.sources.tuxpaint import TuxPaint, stamp_caption

    stamps = TuxPaint(path=path, image_size=None, min_size=0)
    candidates = []
    for p in stamps.items("train"):
        # scenes flip on their own; letters, signs and coins are not things in a scene
        if p.stem.endswith("_mirror") or stamps._category(p) == "symbols":
            continue
        try:
            name = short_name(stamp_caption(p))
        except ValueError:  # a description that is not UTF-8 names no class
            continue
        candidates.append(Candidate(name, stamps._category(p), partial(stamps.load_cutout, p)))
    return candidates


def _emoji_candidates(path: str | None) -> list[Candidate]:
    from ldmkit.data.sources.emoji import Emoji

    emoji = Emoji(path=path)
    return [
        Candidate(item["name"], item["category"], lambda item=item: emoji.load(item).image)
        for item in emoji.items("train")
        # flags are rectangles, symbols are signs: neither is a thing in a scene
        if item["category"] not in ("Flags", "Symbols")
    ]


def _folder_candidates(path: str | None) -> list[Candidate]:
    if path is None:
        raise SourceNotFoundError("semantic_scenes cutouts=folder needs path=DIR of RGBA PNGs")
    root = Path(path).expanduser()
    pngs = sorted(root.rglob("*.png")) if root.is_dir() else []
    if not pngs:
        raise SourceNotFoundError(f"semantic_scenes: no PNG cut-outs under {root}")

    def load(p: Path) -> Image.Image:
        with Image.open(p) as opened:
            return opened.convert("RGBA")

    return [Candidate(p.stem.replace("_", " "), p.parent.name, lambda p=p: load(p)) for p in pngs]


CUTOUT_SOURCES = {
    "tuxpaint": _tuxpaint_candidates,
    "emoji": _emoji_candidates,
    "folder": _folder_candidates,
}


def usable_cutout(image: Image.Image, min_side: int) -> Image.Image | None:
    """Crop to the alpha box; None for stamps too small, too see-through or plain rectangles."""
    alpha = np.asarray(image.getchannel("A")) >= ALPHA_THRESHOLD
    if not alpha.any():
        return None
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    coverage = alpha[box[1] : box[3], box[0] : box[2]].mean()
    if min(box[2] - box[0], box[3] - box[1]) < min_side or not 0.2 <= coverage <= 0.97:
        return None
    image = image.crop(box)
    if max(image.size) > MAX_CUTOUT_SIDE:
        scale = MAX_CUTOUT_SIDE / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.LANCZOS,
        )
    return image


def _short_enough(name: str) -> bool:
    # class names end up in scene captions; "fire truck" reads well, a whole sentence does not
    return len(name.split()) <= 3 and len(name) <= 24


def choose_cutouts(
    candidates: list[Candidate], count: int, seed: int, names: Sequence[str] | None
) -> list[Cutout]:
    """Pick ``count`` cut-outs: the named ones, or a seeded draw spread over categories."""
    if names:
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise DataError(f"semantic_scenes: objects= names {twice!r} twice")
        by_name = {c.name: c for c in candidates}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(
                f"semantic_scenes: unknown cut-out {missing[0]!r}; some that exist: "
                f"{', '.join(sorted(by_name)[:20])}"
            )
        chosen = []
        for name in names:
            image = usable_cutout(by_name[name].load(), min_side=1)
            if image is None:
                raise DataError(f"semantic_scenes: cut-out {name!r} has no opaque pixels")
            chosen.append(Cutout(name, by_name[name].category, image))
        return chosen
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_category.setdefault(candidate.category, []).append(candidate)
    queues = [by_category[c] for c in sorted(by_category)]
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    chosen: list[Cutout] = []
    taken_names: set[str] = set()
    while len(chosen) < count and any(queues):
        for queue in queues:  # round-robin: one per category per pass, for variety
            while queue:
                candidate = queue.pop()
                if candidate.name in taken_names or not _short_enough(candidate.name):
                    continue
                try:
                    image = usable_cutout(candidate.load(), min_side=24)
                except OSError:
                    image = None
                if image is not None:
                    chosen.append(Cutout(candidate.name, candidate.category, image))
                    taken_names.add(candidate.name)
                    break
            if len(chosen) == count:
                break
    if len(chosen) < count:
        raise DataError(
            f"semantic_scenes: only {len(chosen)} usable cut-outs for num_classes={count + 1}"
        )
    return chosen


def render_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A smooth procedural backdrop: a sky-and-ground horizon or a two-colour gradient, with
    low-frequency texture so the model has to look at the map, not at flat colour."""
    kind = "horizon" if rng.random() < 0.5 else "gradient"
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    if kind == "horizon":
        sky_top, sky_bottom = rng.uniform(90, 255, 3), rng.uniform(150, 255, 3)
        ground = rng.uniform(30, 200, 3)
        horizon = rng.uniform(0.4, 0.8)
        sky = sky_top + (sky_bottom - sky_top) * t / horizon
        image = np.where(t < horizon, sky, ground * (0.8 + 0.4 * t))
    else:
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = top + (bottom - top) * t
    image = np.broadcast_to(image, (size, size, 3)).copy()
    grid = rng.uniform(-1, 1, (4, 4)).astype(np.float32)
    texture = np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.Resampling.BICUBIC))
    image += 20.0 * texture[:, :, None]
    return np.clip(image, 0, 255).round().astype(np.uint8), kind


def paste(
    canvas: np.ndarray, seg: np.ndarray, cutout: Image.Image, class_id: int, x: int, y: int
) -> None:
    """Hard-alpha paste: where alpha >= 128 the pixel becomes the cut-out's and the map its class."""
    pixels = np.asarray(cutout)
    mask = pixels[:, :, 3] >= ALPHA_THRESHOLD
    h, w = mask.shape
    region = canvas[y : y + h, x : x + w]
    region[mask] = pixels[:, :, :3][mask]
    seg[y : y + h, x : x + w][mask] = class_id


def placed_cutout(cutout: Image.Image, width: int, height: int, flip: bool) -> Image.Image:
    image = cutout.resize((width, height), Image.Resampling.LANCZOS)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


class SemanticScenes(Source):
    name = "semantic_scenes"
    description = "seeded scenes of real cut-outs on backgrounds + per-pixel class maps (K classes)"
    options = {
        "cutouts": "auto",  # auto (tuxpaint, else emoji) | tuxpaint | emoji | folder
        "path": None,  # where the cut-out source lives (default: its usual place)
        "objects": None,  # comma-separated cut-out names to use as classes 1..K-1
        "num_classes": 8,  # K, background included
        "num_samples": 2000,  # train scenes
        "val_samples": 200,
        "image_size": 64,
        "max_objects": 4,
        "min_scale": 0.3,  # object's longer side, as a fraction of the scene side
        "max_scale": 0.6,
        "seed": 0,
    }
    option_specs = {
        "num_classes": Integer(2, 256),
        "num_samples": Integer(1),
        "val_samples": Integer(0),
        "image_size": Integer(1),
        "max_objects": Integer(1),
    }
    has_labels = False
    has_captions = True
    has_segmentation = True
    shuffle_items = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        cfg = self.config
        names = [n.strip() for n in str(cfg["objects"]).split(",")] if cfg["objects"] else None
        num_classes = len(names) + 1 if names else int(cfg["num_classes"])
        if num_classes > 256:
            raise ValueError(
                f"semantic_scenes: objects= names {num_classes - 1} cut-outs; at most 255"
            )
        if names and "num_classes" in options and int(options["num_classes"]) != num_classes:
            raise ValueError(
                f"semantic_scenes: objects= names {len(names)} cut-outs ({', '.join(names)}), so "
                f"num_classes is {num_classes} with the background, not {options['num_classes']}; "
                f"leave num_classes out or set it to {num_classes}"
            )
        cfg["num_classes"] = num_classes  # what the manifest's options record
        if not 0 < float(cfg["min_scale"]) <= float(cfg["max_scale"]) <= 1:
            raise ValueError("semantic_scenes: need 0 < min_scale <= max_scale <= 1")
        self.cutout_source, candidates = self._candidates(cfg["cutouts"], cfg["path"])
        self.cutouts = choose_cutouts(candidates, num_classes - 1, int(cfg["seed"]), names)
        self.size = int(cfg["image_size"])

    @staticmethod
    def _candidates(kind: str, path: str | None) -> tuple[str, list[Candidate]]:
        if kind == "auto":
            errors = []
            # any folder of PNGs passes for Tux Paint stamps: a path= is the emoji package
            # when it holds one, and only the stamps' own place is looked up before the emoji
            for name in ("emoji", "tuxpaint") if path else ("tuxpaint", "emoji"):
                try:
                    return name, CUTOUT_SOURCES[name](path)
                except SourceNotFoundError as exc:
                    errors.append(str(exc))
            raise SourceNotFoundError(
                "semantic_scenes needs cut-outs: "
                + " | ".join(errors)
                + " | or use cutouts=folder path=DIR with RGBA PNGs"
            )
        if kind not in CUTOUT_SOURCES:
            raise ValueError(
                f"unknown cutouts {kind!r}; expected one of auto, {', '.join(CUTOUT_SOURCES)}"
            )
        return kind, CUTOUT_SOURCES[kind](path)

    @property
    def splits(self) -> list[str]:
        return ["train", "val"] if int(self.config["val_samples"]) > 0 else ["train"]

    @property
    def segmentation_classes(self) -> list[str]:
        return ["background"] + [c.name for c in self.cutouts]

    def items(self, split: str) -> Sequence[Any]:
        count = self.config["num_samples"] if split == "train" else self.config["val_samples"]
        return [(split, index) for index in range(int(count))]

    def layout(self, split: str, index: int) -> tuple[np.random.Generator, list[dict[str, Any]]]:
        """The scene's random stream and its object placements, in paint order."""
        rng = np.random.default_rng([int(self.config["seed"]), SPLIT_CODES[split], index])
        background_rng = np.random.default_rng(rng.integers(2**63))
        count = int(rng.integers(1, int(self.config["max_objects"]) + 1))
        objects = []
        for _ in range(count):
            class_id = int(rng.integers(1, len(self.cutouts) + 1))
            cutout = self.cutouts[class_id - 1].image
            side = rng.uniform(float(self.config["min_scale"]), float(self.config["max_scale"]))
            scale = side * self.size / max(cutout.size)
            width = max(1, min(self.size, round(cutout.width * scale)))
            height = max(1, min(self.size, round(cutout.height * scale)))
            x = int(rng.integers(0, self.size - width + 1))
            y = int(rng.integers(0, self.size - height + 1))
            flip = bool(rng.random() < 0.5)
            objects.append(
                {"class": class_id, "name": self.cutouts[class_id - 1].name,
                 "box": [x, y, width, height], "flip": flip}
            )  # fmt: skip
        # painter's order: what stands lower in the picture is nearer, so drawn last
        objects.sort(key=lambda o: o["box"][1] + o["box"][3])
        return background_rng, objects

    def load(self, item: tuple[str, int]) -> SourceSample:
        split, index = item
        background_rng, objects = self.layout(split, index)
        canvas, background = render_background(background_rng, self.size)
        seg = np.zeros((self.size, self.size), dtype=np.uint8)
        for obj in objects:
            x, y, width, height = obj["box"]
            cutout = placed_cutout(self.cutouts[obj["class"] - 1].image, width, height, obj["flip"])
            paste(canvas, seg, cutout, obj["class"], x, y)
        names = list(dict.fromkeys(o["name"] for o in objects))
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return SourceSample(
            image=Image.fromarray(canvas),
            caption=f"a scene with {listed}",
            segmentation=Image.fromarray(seg),
            meta={"objects": objects, "background": background, "origin": f"{split}[{index}]"},
        )

    def notes(self) -> list[str]:
        return [
            f"cut-outs from {self.cutout_source}: "
            + ", ".join(f"{i + 1}={c.name} ({c.category})" for i, c in enumerate(self.cutouts))
        ]
