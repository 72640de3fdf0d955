"""Export a checkpoint's model folder (save_pretrained model + processor) to ``--output``.

Each checkpoint already holds a complete ``save_pretrained`` folder, so exporting is a copy
to any fsspec URL. An output folder is only ever replaced when it is empty or was written by
an earlier export (it holds an eval card): nothing else is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raycaption import storage
from raycaption.config import StorageConfig
from raycaption.errors import ConfigError
from raycaption.train.evaluate import CARD_JSON, CARD_MD, CARD_PREDICTIONS
from raycaption.train.loop import MODEL_DIR

logger = logging.getLogger(__name__)


def check_output(output: str, storage_cfg: StorageConfig) -> None:
    """Fail before training when ``output`` is not writable or holds something else."""
    try:
        fs, path = storage.filesystem(output, storage_cfg)
        if fs.exists(path):
            if not fs.isdir(path):
                raise ConfigError(f"--output {storage.redact(output)} is a file, not a folder")
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            if names and CARD_JSON not in names:
                raise ConfigError(
                    f"--output {storage.redact(output)} is not empty and holds no {CARD_JSON} "
                    "(not an earlier fine-tuning export); choose an empty or new folder"
                )
        fs.makedirs(path, exist_ok=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend failure means "cannot write"
        raise ConfigError(
            f"--output {storage.redact(output)} is not writable: {type(exc).__name__}: {exc}"
        ) from None


@contextlib.contextmanager
def checkpoint_model_folder(checkpoint: Any) -> Iterator[str]:
    """A local path of the checkpoint's ``model/`` folder; only that folder is downloaded
    (never the optimizer state, which is twice the model's size)."""
    import pyarrow.fs as pafs

    src = f"{checkpoint.path.rstrip('/')}/{MODEL_DIR}"
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield src
        return
    with tempfile.TemporaryDirectory(prefix="raycaption-model-") as tmp:
        pafs.copy_files(src, tmp, source_filesystem=checkpoint.filesystem)
        yield tmp


def export_checkpoint(checkpoint: Any, output: str, storage_cfg: StorageConfig) -> list[str]:
    """Copy the checkpoint's model folder into ``output``; returns the file names written.

    Files of an earlier export that the new model does not have are removed, so the folder
    never mixes two models.
    """
    fs, root = storage.filesystem(output, storage_cfg)
    root = root.rstrip("/")
    with checkpoint_model_folder(checkpoint) as folder:
        src = Path(folder)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        names = [p.relative_to(src).as_posix() for p in files]
        keep = {*names, CARD_JSON, CARD_MD, CARD_PREDICTIONS}
        if fs.exists(root):
            for old in fs.find(root):
                if old[len(root) :].lstrip("/") not in keep:
                    fs.rm(old)
        fs.makedirs(root, exist_ok=True)
        for p, rel in zip(files, names, strict=True):
            if "/" in rel:
                fs.makedirs(f"{root}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
            fs.put_file(str(p), f"{root}/{rel}")
    logger.info("exported %d files to %s", len(names), storage.redact(output))
    return names
