"""Writing a whole local folder at once: readers see the old folder or the new one, never half of one.

Model folders (built, trained, exported) are written this way by captioning, analysis and
training: into a temporary sibling, then swapped in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def open_permissions(root: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: give the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_folder(target: Path, write: Callable[[Path], None],
                 done: Callable[[], bool] = lambda: False) -> None:
    """Write into a temporary sibling, then swap it in, so readers never see a half-written
    folder. ``done()`` is asked before the swap: another process may have finished first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = None
    try:
        write(tmp)
        open_permissions(tmp)
        if done():
            return
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old)  # a directory rename cannot overwrite a non-empty one
        os.replace(tmp, target)
    finally:
        for path in (tmp, old):
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)
