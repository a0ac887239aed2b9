"""Adapter directories on disk: HF PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

Crash safety: a directory is written under a temporary name, every file and the directory are
fsynced, and only then is it renamed into place (rename is atomic on POSIX filesystems). A
checkpoint root also holds ``latest`` (the name of the newest complete directory), replaced
atomically after the directory exists. So a kill -9 at any moment leaves every visible
``step_<N>`` directory complete and ``latest`` pointing at one of them.
Only safetensors are read (no pickle); an unreadable file is an error naming it.
"""
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"


class AdapterFileError(ValueError):
    """An adapter directory or file that is missing, truncated or inconsistent."""


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_adapter_dir(directory: str, tensors: Dict[str, np.ndarray], config: dict,
                      extra: Optional[Callable[[str], None]] = None) -> str:
    """Write ``directory`` atomically (replacing an existing one); returns its path.

    ``tensors`` go to adapter_model.safetensors (PEFT's metadata ``format: pt``), ``config``
    to adapter_config.json; ``extra(tmp_dir)`` may add more files before the rename.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.path.basename(directory)}-", dir=parent)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        if extra is not None:
            extra(tmp)
        for name in os.listdir(tmp):
            _fsync_path(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)
        _fsync_path(tmp)
        old = None
        if os.path.exists(directory):  # re-saving a step: move the old one aside first
            old = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=parent)
            os.rename(directory, os.path.join(old, "d"))
        os.rename(tmp, directory)
        _fsync_path(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_path(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_adapter_dir(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(adapter_config.json dict, tensors by key) of an adapter directory."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterFileError(f"{path} is missing: not an adapter directory "
                                   f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON: {exc}") from exc
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{weights_path} is not a readable safetensors file "
                               f"(truncated or corrupt?): {exc}") from exc
    return config, tensors


def step_dirs(root: str) -> List[Tuple[int, str]]:
    """Complete ``step_<N>`` directories under ``root`` as (N, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.fullmatch(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_adapter_dir(path: str) -> str:
    """An adapter directory itself, or a checkpoint root (its ``latest``, else newest step)."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as handle:
            target = os.path.join(path, handle.read().strip())
        if os.path.isfile(os.path.join(target, CONFIG_NAME)):
            return target
    steps = step_dirs(path)
    if steps:
        return steps[-1][1]
    raise AdapterFileError(f"{path}: no adapter here (neither {CONFIG_NAME}, nor a '{LATEST}' "
                           f"pointer, nor step_<N> directories)")


def clean_stale(root: str) -> None:
    """Remove temporary directories a killed save left under ``root``."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(_TMP_PREFIX):
                path = os.path.join(root, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)


def prune(root: str, keep_last: int) -> List[str]:
    """Delete all but the newest ``keep_last`` step directories (never ``latest``'s); each is
    renamed to a temporary name before it is deleted (``clean_stale`` removes leftovers)."""
    keep = {resolve_adapter_dir(root)} if os.path.isfile(os.path.join(root, LATEST)) else set()
    steps = step_dirs(root)
    removed = []
    for _, path in steps[: max(len(steps) - keep_last, 0)]:
        if path not in keep:
            # rename first (atomic), so a kill mid-delete never leaves a half-deleted step_<N>
            doomed = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}prune-", dir=root)
            os.rename(path, os.path.join(doomed, "d"))
            shutil.rmtree(doomed)
            removed.append(path)
    return removed
