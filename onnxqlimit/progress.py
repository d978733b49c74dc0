"""Progress bars: tqdm (with its ETA) on a terminal; none when stderr is a file or a pipe,
where a bar's carriage returns would fill a log. The per-block lines of reconstruction are
printed either way, so a log still shows the run moving."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(enabled: bool, iterable=None, **kwargs) -> tqdm:
    return tqdm(iterable, disable=not enabled or not sys.stderr.isatty(), **kwargs)
