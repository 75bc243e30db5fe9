"""Click options that several `int8eval` commands share and that do more than parse a value."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.console import Console

from int8eval.errors import ConfigError


def decode_cache_options(fn):
    """`--cache DIR` / `--no-cache` for a command that decodes images, passed on to it as `decode_cache` (the folder,
    or None). The command runs with that cache active (int8eval.data.cache) and, when it succeeds, says on stderr the
    cache's location and size and what it read and added; a folder that cannot be written stops it before any work.
    Apply it under `_friendly`, which turns its errors into messages."""

    @click.option("--cache", "cache_dir", type=click.Path(path_type=Path), help="Decoded images kept between runs "
                  "(default: $INT8EVAL_CACHE/decoded, else ~/.cache/int8eval/decoded).")
    @click.option("--no-cache", is_flag=True, help="Decode every image; read and write no decoded-image cache.")
    @functools.wraps(fn)
    def wrapper(*args, cache_dir: Path | None, no_cache: bool, **kw):
        from int8eval.data.cache import default_root, using  # lazily, as cli.py imports the library

        if cache_dir is not None and no_cache:
            raise ConfigError("--cache has no effect with --no-cache: it reads and writes no cache; drop one of the two")
        root = None if no_cache else Path(cache_dir or default_root()).expanduser().absolute()  # as recorded
        say = functools.partial(Console(stderr=True).print, markup=False, highlight=False, soft_wrap=True)
        with using(root, say=say):
            return fn(*args, decode_cache=root, **kw)

    return wrapper
