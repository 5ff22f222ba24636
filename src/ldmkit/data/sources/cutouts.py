"""Captioned cut-outs for text-to-image: Google's emoji and Tux Paint stamps under one label set.

Both collections are clip-art objects on a transparent background with a real caption (the
emoji's Unicode name, "grinning face"; the stamp's description, "A frog."), so they train one
text-to-image model together. The two collections label differently (Unicode categories and
sub-categories vs Tux Paint folders), so ``CATEGORY_RULES`` maps both onto eight shared
categories chosen to be *visually* distinct at 32x32 pixels and large enough to learn:

    face      round yellow smiley faces (Smileys & Emotion face-*, cat and monkey faces)
    person    people and families (People & Body person-* and family; Tux Paint people)
    animal    mammals, birds, sea animals, bugs, reptiles (emoji animal-*; Tux Paint animals)
    plant     flowers, trees, mushrooms, leaves (emoji plant-*; Tux Paint plants)
    food      food and drink (Food & Drink without dishware; Tux Paint food)
    vehicle   cars, trains, boats, planes (emoji transport-*; Tux Paint vehicles, military vehicles)
    building  houses, towers, temples (emoji place-building/-religious, hotel; Tux Paint houses,
              monuments)
    clothing  clothes, shoes, hats, bags (emoji clothing; Tux Paint clothes)

Left out, and why: flags (the same rectangle with different stripes: a 32x32 classifier, or a
text-to-image model, cannot tell what a flag "is"), symbols, signs, letters, arrows, keycaps
and clocks (meaning carried by tiny glyphs, not by shape and colour), hearts and emotion
marks, hands and body parts (a few dozen items, easily confused with faces), and the
heterogeneous rest (objects, tools, sports, weather, seasonal decorations), which is a mixture
of everything rather than a category. Tux Paint's ``_mirror`` stamps are left out too: a mirror
and its original would land on both sides of the train/val split (flip at load time instead).

The held-out ``val`` split is stratified and deterministic: within each category the items,
in a stable order, are dealt so that every ``round(1/holdout)``-th one is held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldmkit.config_checks import Integer, Number
from ldmkit.data.errors import SourceNotFoundError
from ldmkit.data.sources.base import Source, SourceSample, fit_to_square
from ldmkit.data.sources.emoji import Emoji
from ldmkit.data.sources.tuxpaint import TuxPaint

CATEGORIES = ("face", "person", "animal", "plant", "food", "vehicle", "building", "clothing")

# (collection, emoji category or stamp folder, emoji subcategories or stamp sub-folders) ->
# category; the first matching rule wins. A sub-folder also matches the folders below it, ""
# matches stamps directly in the folder, and an empty tuple matches everything in the group.
FACES = ("face-smiling", "face-affection", "face-tongue", "face-hand", "face-neutral-skeptical",
         "face-sleepy", "face-unwell", "face-hat", "face-glasses", "face-concerned",
         "face-negative", "face-costume", "cat-face", "monkey-face")  # fmt: skip
PEOPLE = ("person", "person-gesture", "person-role", "person-fantasy", "person-activity",
          "person-sport", "person-resting", "family")  # fmt: skip
CATEGORY_RULES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("emoji", "Smileys & Emotion", FACES, "face"),
    ("emoji", "People & Body", PEOPLE, "person"),
    ("emoji", "Animals & Nature", ("animal-mammal", "animal-bird", "animal-amphibian",
                                   "animal-reptile", "animal-marine", "animal-bug"), "animal"),
    ("emoji", "Animals & Nature", ("plant-flower", "plant-other"), "plant"),
    ("emoji", "Food & Drink", ("food-fruit", "food-vegetable", "food-prepared", "food-asian",
                               "food-marine", "food-sweet", "drink"), "food"),
    ("emoji", "Travel & Places", ("transport-ground", "transport-air", "transport-water"),
     "vehicle"),
    ("emoji", "Travel & Places", ("place-building", "place-religious", "hotel"), "building"),
    ("emoji", "Objects", ("clothing",), "clothing"),
    ("tuxpaint", "people", ("", "cartoon"), "person"),
    ("tuxpaint", "animals", (), "animal"),
    ("tuxpaint", "plants", (), "plant"),
    ("tuxpaint", "food", (), "food"),
    ("tuxpaint", "vehicles", (), "vehicle"),
    ("tuxpaint", "military", ("vehicles",), "vehicle"),
    ("tuxpaint", "town", ("houses", "monuments"), "building"),
    ("tuxpaint", "clothes", (), "clothing"),
)  # fmt: skip

COLLECTIONS = ("emoji", "tuxpaint")


def category_of(collection: str, group: str, subgroup: str) -> str | None:
    """The shared category of an emoji (category, subcategory) or a stamp (folder, sub-folder
    path below it, "" for stamps directly in the folder); None when it is left out."""
    for rule_collection, rule_group, subgroups, category in CATEGORY_RULES:
        if rule_collection != collection or rule_group != group:
            continue
        if not subgroups or any(
            subgroup == wanted or (wanted and subgroup.startswith(wanted + "/"))
            for wanted in subgroups
        ):
            return category
    return None


class Cutouts(Source):
    name = "cutouts"
    description = (
        "emoji + Tux Paint stamps for text-to-image: RGBA cut-outs, caption = name/description, "
        f"label = one of {len(CATEGORIES)} shared categories"
    )
    # collections: a comma list of emoji,tuxpaint (both by default: a missing one is an error)
    # holdout: fraction of each category held out as the val split
    options = {
        "collections": "emoji,tuxpaint",
        "emoji_path": None,
        "tuxpaint_path": None,
        "image_size": 64,
        "holdout": 0.1,
    }
    # every round(1/holdout)-th item is held out: beyond 1/2, that is 1/2 all the same
    option_specs = {"image_size": Integer(1), "holdout": Number(0, 0.5, above=True)}
    has_captions = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        collections = [c.strip() for c in str(self.config["collections"]).split(",") if c.strip()]
        unknown = [c for c in collections if c not in COLLECTIONS]
        if unknown or not collections:
            raise ValueError(
                f"cutouts: unknown collection {unknown[0] if unknown else ''!r}; expected a comma "
                f"list of {', '.join(COLLECTIONS)}"
            )
        holdout = float(self.config["holdout"])
        self._classes = list(CATEGORIES)
        items: list[dict[str, Any]] = []
        self._left_out: dict[str, int] = {}
        try:
            if "emoji" in collections:
                self.emoji = Emoji(path=self.config["emoji_path"])
                items += self._emoji_items()
            if "tuxpaint" in collections:
                self.stamps = TuxPaint(
                    path=self.config["tuxpaint_path"], image_size=None, min_size=32
                )
                items += self._stamp_items()
        except SourceNotFoundError as exc:
            raise SourceNotFoundError(
                f"cutouts needs {' and '.join(collections)}: {exc} (or pass "
                f"collections=emoji / collections=tuxpaint to use one)"
            ) from None
        self._splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        every = max(2, round(1 / holdout))
        for category in CATEGORIES:
            members = sorted(
                (i for i in items if i["category"] == category),
                key=lambda i: (i["collection"], i["origin"]),
            )
            for index, item in enumerate(members):
                self._splits["val" if index % every == every // 2 else "train"].append(item)

    def _emoji_items(self) -> list[dict[str, Any]]:
        chosen = []
        for item in self.emoji.items("train"):
            category = category_of("emoji", item["category"], item["subcategory"])
            if category is None:
                key = f"emoji {item['category']}"
                self._left_out[key] = self._left_out.get(key, 0) + 1
                continue
            chosen.append(
                {"collection": "emoji", "category": category, "origin": item["image"], "ref": item}
            )
        return chosen

    def _stamp_items(self) -> list[dict[str, Any]]:
        chosen = []
        for path in self.stamps.items("train"):
            relative = path.relative_to(self.stamps.root)
            folder = relative.parts[0] if len(relative.parts) > 1 else "uncategorized"
            subfolder = "/".join(relative.parts[1:-1])
            category = category_of("tuxpaint", folder, subfolder)
            if path.stem.endswith("_mirror") or category is None:
                key = "tuxpaint mirror stamps" if category else f"tuxpaint {folder}"
                self._left_out[key] = self._left_out.get(key, 0) + 1
                continue
            chosen.append(
                {
                    "collection": "tuxpaint",
                    "category": category,
                    "origin": relative.as_posix(),
                    "ref": path,
                }
            )
        return chosen

    @property
    def splits(self) -> list[str]:
        return ["train", "val"]

    def items(self, split: str) -> Sequence[Any]:
        return list(self._splits[split])

    def load(self, item: dict[str, Any]) -> SourceSample:
        # the collections' own loaders (captions, alpha, the stamp's min_size check)
        if item["collection"] == "emoji":
            loaded = self.emoji.load(item["ref"])
        else:
            loaded = self.stamps.load(Path(item["ref"]))
        size = int(self.config["image_size"])
        image = (
            loaded.image if loaded.image.size == (size, size) else fit_to_square(loaded.image, size)
        )
        return SourceSample(
            image=image,
            label=CATEGORIES.index(item["category"]),
            caption=loaded.caption,
            meta={
                "class_name": item["category"],
                "collection": item["collection"],
                "collection_class": loaded.meta["class_name"],
                "origin": item["origin"],
            },
        )

    def notes(self) -> list[str]:
        notes = [f"categories: {', '.join(CATEGORIES)} (see ldmkit.data.sources.cutouts)"]
        if hasattr(self, "emoji"):
            notes += self.emoji.notes()
        if hasattr(self, "stamps"):
            notes += self.stamps.notes()
        notes += [
            f"left out {count} items of {key}" for key, count in sorted(self._left_out.items())
        ]
        return notes
