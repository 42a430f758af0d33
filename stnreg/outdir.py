"""The output folder rule of ``stnreg register``, checked before any work starts.

An output folder may be new or empty. A non-empty one is refused unless the user says
``overwrite`` (files of ours are replaced, other files are left alone) or ``resume`` (a batch
continues where it stopped). A path that is a file, or one of the inputs, is always refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError

__all__ = ["check_output_folder"]


def check_output_folder(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False, resume: bool = False
) -> Path:
    """Return ``out`` as a path after checking it may receive results (see the module docstring).

    Raises:
        InputError: ``out`` is a file, an input, or a non-empty folder without ``overwrite``/``resume``.
    """
    path = Path(out)
    resolved = path.resolve()
    for p in inputs:
        if p and Path(p).resolve() == resolved:
            raise InputError(f"{out}: the output folder is an input file")
    if path.exists() and not path.is_dir():
        raise InputError(f"{out}: exists and is a file; the output must be a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise InputError(
            f"{out}: the output folder is not empty; give --overwrite to replace its results (other files are "
            "kept), or another folder"
        )
    return path
