"""What the ``data`` keys take (the types and ranges composition checks; the defaults are
each ``conf/data/*.yaml``'s). Declared to the config checker through
``ldmkit_register_config_keys`` by the data package's built-in plugin
(:mod:`ldmkit.data.sources`)."""

from __future__ import annotations

from ldmkit.config_checks import (
    Boolean,
    Choice,
    Either,
    Integer,
    Number,
    Numbers,
    Spec,
    Table,
    Text,
)
from ldmkit.data.transforms import CROPS

__all__ = ["DATA_KEYS"]

DATA_KEYS: dict[str, Spec] = {
    "source": Text(null=True),
    # a folder, http(s):// URL, pipe:CMD or brace-expanded shard list (ldmkit.data.location)
    "path": Text(null=True),
    "manifest": Text(null=True),
    "image_size": Integer(1),
    "channels": Choice(1, 3),
    "crop": Choice(*CROPS),
    "flip": Boolean(),
    # ldmkit.data.transforms.parse_background: a colour name or hex, a gray level, [r, g, b]
    "background": Either(Text(), Number(0, 255), Numbers(Number(0, 255), 3)),
    "shuffle_buffer": Integer(0),
    "resampled": Boolean(null=True),
    "prepare": Table(),
    "retries": Integer(0),
    "retry_delay": Number(0),
    "stall_timeout": Number(0, above=True, null=True),
}
