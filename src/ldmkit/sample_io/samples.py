"""What ``ldmkit sample`` and ``ldmkit demo`` write: the grid, one PNG per sample and the
settings JSON that reproduces them, with the sampler's and the conditions' settings. Both
entry points import this module; it imports neither of them."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["condition_settings", "grid_format", "sampler_settings", "to_pil", "write_samples"]


def sampler_settings(pipeline) -> dict:
    """The sampler's name and options as configured, with the steps and spacing it runs."""
    from omegaconf import OmegaConf

    node = pipeline.config.sampler if pipeline.config is not None else None
    settings = dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}
    settings.setdefault("name", type(pipeline.sampler).__name__)
    settings["steps"] = getattr(pipeline.sampler, "steps", settings.get("steps"))
    spacing = getattr(pipeline.sampler, "spacing", settings.get("spacing"))
    if spacing is not None:
        settings["spacing"] = spacing
    return settings


def condition_settings(batch: dict, kinds: dict[str, str], sources: dict[str, str]) -> dict:
    """Each condition key: its per-sample values (labels, prompts) or the file(s) it came from."""
    out = {}
    for key in kinds:
        if f"--cond {key}" in sources:
            out[key] = sources[f"--cond {key}"]
        elif key in batch and kinds[key] == "number":
            from ldmkit.visualize import number_values

            out[key] = number_values(batch[key])
        elif key in batch:
            value = batch[key]
            out[key] = value.tolist() if hasattr(value, "tolist") else list(value)
    return out


def write_samples(
    images,
    out: Path,
    settings: dict,
    *,
    conditioner=None,
    batch=None,
    kinds: dict[str, str] | None = None,
    show_conditions: bool = False,
    rows: int | None = None,
    names: dict[str, list[str] | None] | None = None,
    files: dict[str, list[str]] | None = None,
    init_image=None,
    mask=None,
) -> dict[str, Path]:
    """``out`` (the grid: ``rows`` rows, default roughly square), ``<out stem>/NNNNNN.png``
    (sample i, seed + i) and ``<out stem>.json`` (``settings`` plus each image's file, seed
    and condition, with ``KEY_name`` for a class key whose ``names`` are known, and the file
    each image's image-like condition came from: ``files``, key -> one path per image). Each
    file is replaced atomically; the JSON is written last. ``show_conditions``: one row per
    sample, its condition inputs, ``init_image`` and ``mask`` before it."""
    from ldmkit.io import atomic_path, atomic_write_text
    from ldmkit.pipeline import image_grid_rows
    from ldmkit.visualize import save_image

    folder = out.parent / out.stem
    folder.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    per_image = []
    for i in range(n):
        path = folder / f"{i:06d}.png"
        with atomic_path(path) as tmp:
            to_pil(images[i]).save(tmp, format="png")
        entry = {"file": path.relative_to(out.parent).as_posix(), "seed": settings["seed"] + i}
        for key, kind in (kinds or {}).items():
            if (
                kind in ("class", "text", "tokens")
                and batch is not None
                and key in batch
                and len(batch[key]) == n
            ):
                value = batch[key][i]
                entry[key] = value.tolist() if hasattr(value, "tolist") else value
                known = (names or {}).get(key)
                if kind == "class" and known and 0 <= entry[key] < len(known):
                    entry[f"{key}_name"] = known[entry[key]]
        for key, paths in (files or {}).items():
            if len(paths) == n:
                entry[key] = paths[i]
        per_image.append(entry)
    with atomic_path(out) as tmp:
        if show_conditions and conditioner is not None:
            from ldmkit.visualize import samples_with_conditions

            tiles, per_row = samples_with_conditions(images, conditioner, batch, init_image=init_image, mask=mask)
            save_image(tiles, tmp, nrow=per_row or image_grid_rows(n), format=grid_format(out))
        else:
            per_row = -(-n // rows) if rows else image_grid_rows(n)
            save_image((images + 1) / 2, tmp, nrow=per_row, format=grid_format(out))
    record = {**settings, "grid": out.name, "images": per_image}
    json_path = out.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(record, indent=2, default=str) + "\n")
    return {"grid": out, "folder": folder, "settings": json_path}


def grid_format(path: Path) -> str:
    """The image format PIL writes for ``path``'s extension (``.png`` -> ``PNG``); a
    :class:`ValueError` naming the path where the extension is none PIL can write (``o.txt``),
    rather than PNG bytes under a name that says otherwise."""
    from PIL import Image

    Image.init()
    fmt = Image.EXTENSION.get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(
            f"{path}: {path.suffix or 'no extension'} is not an image format PIL writes; "
            f"name the grid {path.with_suffix('.png').name} (or .jpg, .webp)"
        )
    return fmt


def to_pil(image):
    """C×H×W in [-1, 1] -> an 8-bit PIL image (L for one channel, RGB for three), rounded
    as torchvision's save_image rounds the grid."""
    from PIL import Image

    array = ((image.detach().float().clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to("cpu")
    array = array.byte().numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    return Image.fromarray(array[:3].transpose(1, 2, 0), mode="RGB")
