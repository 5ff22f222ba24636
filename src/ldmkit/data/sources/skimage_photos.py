"""scikit-image's bundled sample photos (``skimage.data``), as seeded square crops.

Eighteen photographs ship inside the scikit-image wheel (no download): 8 in colour, 10 gray.
Each photo is a class (its name is the label's name, a short description the caption); a
sample is a square crop of it, ``min_scale``..1 of the photo's shorter side, resized to
``image_size``. Crop ``i`` of a photo in a split depends only on (seed, split, photo, i), so
the same options give the same shards. The held-out splits are other crops of the *same*
photos: they measure how well the photos are fit, not generalization to new ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ldmkit.config_checks import Integer, Number
from ldmkit.data.errors import SourceNotFoundError
from ldmkit.data.sources.base import Source, SourceSample

# name -> (how skimage.data gives it, caption); the order fixes each photo's random stream
PHOTOS: dict[str, tuple[Callable[[Any], np.ndarray], str]] = {
    # colour
    "astronaut": (lambda data: data.astronaut(), "the astronaut Eileen Collins"),
    "cat": (lambda data: data.chelsea(), "Chelsea the cat"),
    "coffee": (lambda data: data.coffee(), "a cup of coffee"),
    "rocket": (lambda data: data.rocket(), "a rocket launch"),
    "hubble_deep_field": (lambda data: data.hubble_deep_field(), "galaxies of the Hubble deep field"),
    "immunohistochemistry": (lambda data: data.immunohistochemistry(), "stained tissue under a microscope"),
    "retina": (lambda data: data.retina(), "the retina of a human eye"),
    "motorcycle": (lambda data: data.stereo_motorcycle()[0], "a motorcycle"),
    # gray
    "camera": (lambda data: data.camera(), "a man with a camera"),
    "coins": (lambda data: data.coins(), "Greek coins"),
    "moon": (lambda data: data.moon(), "the surface of the moon"),
    "page": (lambda data: data.page(), "a page of printed text"),
    "clock": (lambda data: data.clock(), "a clock, blurred by motion"),
    "text": (lambda data: data.text(), "a photographed inscription"),
    "grass": (lambda data: data.grass(), "grass"),
    "gravel": (lambda data: data.gravel(), "gravel"),
    "brick": (lambda data: data.brick(), "a brick wall"),
    "cell": (lambda data: data.cell(), "a cell under a microscope"),
}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SkimagePhotos(Source):
    name = "skimage_photos"
    description = "square crops of scikit-image's 18 bundled photos; label and caption = the photo"
    options = {
        "photos": "all",  # all, or a comma list of PHOTOS names
        "crops": 64,  # crops per photo in train
        "val_crops": 8,
        "test_crops": 8,
        "image_size": 64,
        "min_scale": 0.25,  # the crop side, as a fraction of the photo's shorter side: min_scale..1
        "seed": 0,
    }
    option_specs = {
        "crops": Integer(1),
        "val_crops": Integer(0),
        "test_crops": Integer(0),
        "image_size": Integer(1),
        "min_scale": Number(0, 1, above=True),
    }
    has_captions = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        try:
            import skimage.data
        except ImportError:
            raise SourceNotFoundError(
                "skimage_photos needs scikit-image, which is not installed: "
                "pip install 'ldmkit[photos]' (or pip install scikit-image)"
            ) from None
        self._data = skimage.data
        chosen = self.config["photos"]
        listed = chosen if isinstance(chosen, list) else str(chosen or "").split(",")
        names = list(PHOTOS) if chosen == "all" else [str(n).strip() for n in listed if str(n).strip()]
        unknown = [n for n in names if n not in PHOTOS]
        if unknown or not names:
            problem = f"unknown photo {unknown[0]!r}" if unknown else "photos= names no photo"
            raise ValueError(
                f"skimage_photos: {problem}; the photos are: {', '.join(sorted(PHOTOS))} (or all)"
            )
        self._classes = sorted(set(names))
        self._photos: dict[str, np.ndarray] = {}

    @property
    def splits(self) -> list[str]:
        return ["train"] + [s for s in ("val", "test") if int(self.config[f"{s}_crops"]) > 0]

    def items(self, split: str) -> Sequence[Any]:
        count = int(self.config["crops" if split == "train" else f"{split}_crops"])
        return [(split, name, i) for name in self._classes for i in range(count)]

    def photo(self, name: str) -> np.ndarray:
        """The whole photo, uint8 H x W (gray) or H x W x 3."""
        if name not in self._photos:
            self._photos[name] = PHOTOS[name][0](self._data)
        return self._photos[name]

    def load(self, item: tuple[str, str, int]) -> SourceSample:
        split, name, index = item
        photo = self.photo(name)
        height, width = photo.shape[:2]
        rng = np.random.default_rng([int(self.config["seed"]), SPLIT_CODES[split], list(PHOTOS).index(name), index])
        side = max(1, round(rng.uniform(float(self.config["min_scale"]), 1.0) * min(height, width)))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        size = int(self.config["image_size"])
        image = Image.fromarray(photo[y : y + side, x : x + side])
        return SourceSample(
            image=image.resize((size, size), Image.Resampling.LANCZOS),
            label=self._classes.index(name),
            caption=PHOTOS[name][1],
            meta={"class_name": name, "box": [x, y, side], "origin": f"{name}/{split}[{index}]"},
        )

    def notes(self) -> list[str]:
        import skimage

        return [f"photos of scikit-image {skimage.__version__}: {', '.join(self._classes)}"]
