"""Model families behind one Captioner interface, chosen from the model's own config.

``inspect_model`` runs on the driver and reads only small JSON files (config and image
processor), so a wrong model reference fails in seconds, before any weights load.
``load_captioner`` runs once per caption actor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from raycaption import storage
from raycaption.config import ModelConfig, StorageConfig
from raycaption.errors import ConfigError
from raycaption.images import resize_spec_from_processor_config
from raycaption.models.info import ModelInfo

if TYPE_CHECKING:  # torch is imported only where a model is loaded
    from raycaption.models.base import Captioner

logger = logging.getLogger(__name__)

# model_type in config.json -> family name. New families register here.
FAMILIES = {"git": "git", "blip": "blip", "blip-2": "blip-2"}
_SMALL_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")


def _captioner_class(family: str) -> type[Captioner]:
    if family == "git":
        from raycaption.models.git import GitCaptioner

        return GitCaptioner
    if family == "blip":
        from raycaption.models.blip import BlipCaptioner

        return BlipCaptioner
    from raycaption.models.blip2 import Blip2Captioner

    return Blip2Captioner


def is_remote_folder(name: str) -> bool:
    """An object-storage folder (``s3://…``) rather than a local folder or a hub id."""
    return "://" in name and storage.protocol_of(name) not in ("file", "local")


def inspect_model(cfg: ModelConfig, storage_cfg: StorageConfig) -> ModelInfo:
    """Resolve the model reference and its family without loading weights."""
    _require_transformers_5()
    name = cfg.name
    remote = is_remote_folder(name)
    if remote:
        with tempfile.TemporaryDirectory(prefix="raycaption-model-") as tmp:
            _fetch_small_files(name, storage_cfg, Path(tmp))
            return _inspect_local(cfg, tmp, remote=True)
    local = name[len("file://") :] if name.startswith("file://") else name
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ConfigError(
                f"model folder {name!r} has no config.json (not a save_pretrained folder)"
            )
        return _inspect_local(cfg, local, remote=False)
    if local.startswith(("/", ".", "~")) or os.sep in local.strip("/").replace("/", "", 1):
        raise ConfigError(f"model {name!r} is neither an existing folder nor a hub id")
    return _inspect_local(cfg, local, remote=False)


def _require_transformers_5() -> None:
    import transformers

    # transformers 4.x re-encodes GIT's image at every generated token.
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ConfigError(f"raycaption needs transformers >= 5, found {transformers.__version__}")


def _inspect_local(cfg: ModelConfig, ref: str, remote: bool) -> ModelInfo:
    from transformers import AutoConfig
    from transformers.image_processing_base import ImageProcessingMixin

    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        model_config = AutoConfig.from_pretrained(ref, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/network/parse errors all mean "unknown model"
        raise ConfigError(
            f"cannot load model config for {cfg.name!r}: {type(exc).__name__}: "
            f"{storage.redact_text(str(exc)).splitlines()[0][:300]}"
        ) from None
    model_type = model_config.model_type
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            f"model {cfg.name!r} has model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    if cfg.prompt and not _captioner_class(family).accepts_prompt:
        raise ConfigError(f"--prompt is not supported for {family} models (use BLIP or BLIP-2)")
    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(ref, **kwargs)
        spec = resize_spec_from_processor_config(processor_dict)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot read the image processor of {cfg.name!r}: {exc}") from None
    return ModelInfo(cfg.name, family, model_type, spec, remote)


def _fetch_small_files(url: str, storage_cfg: StorageConfig, dest: Path) -> None:
    fs, root = storage.filesystem(url, storage_cfg)
    try:
        if not fs.exists(f"{root.rstrip('/')}/config.json"):
            raise ConfigError(f"model folder {storage.redact(url)} has no config.json")
        for fname in _SMALL_FILES:
            src = f"{root.rstrip('/')}/{fname}"
            if fs.exists(src):
                fs.get(src, str(dest / fname))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model folder {storage.redact(url)} is unreachable: {exc}") from None


def materialize(name: str, storage_cfg: StorageConfig) -> str:
    """A local path (or hub id) ``from_pretrained`` can open. Object-storage folders are
    copied once per node into a cache keyed by URL; a finished copy is renamed into place so a
    half-copied folder is never used."""
    if not is_remote_folder(name):
        return name[len("file://") :] if name.startswith("file://") else name
    cache_root = Path(os.environ.get("RAYCAPTION_CACHE", Path.home() / ".cache" / "raycaption"))
    key = hashlib.sha256(storage.redact(name).encode()).hexdigest()[:24]
    final = cache_root / "models" / key
    if (final / ".complete").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=final.parent))
    fs, root = storage.filesystem(name, storage_cfg)
    root = root.rstrip("/")
    for path in fs.find(root):
        rel = path[len(root) :].lstrip("/")
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(path, str(target))
    (tmp / ".complete").write_text(json.dumps({"source": storage.redact(name)}))
    try:
        tmp.rename(final)
    except OSError:
        # Another actor on this node won the race; use its copy.
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def load_captioner(info: ModelInfo, cfg: ModelConfig, storage_cfg: StorageConfig) -> Captioner:
    """Load the model once (called in each caption actor's constructor)."""
    return _captioner_class(info.family)(materialize(cfg.name, storage_cfg), cfg)


__all__ = ["ModelInfo", "inspect_model", "load_captioner", "materialize"]
