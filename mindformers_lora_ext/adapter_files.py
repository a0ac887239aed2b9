"""Adapter directories on disk: HF PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

Crash safety: a directory is written under a temporary name, every file and the directory are
fsynced, and only then is it renamed into place (rename is atomic on POSIX filesystems). A
checkpoint root also holds ``latest`` (the name of the newest complete directory), replaced
atomically after the directory exists. So a kill -9 at any moment leaves every visible
``step_<N>`` directory complete and ``latest`` pointing at one of them.
Only safetensors are read (no pickle); an unreadable file is an error naming it.

Our own metadata (``mindformers_*`` keys: the pet type, the MindFormers <-> HF name map) lives in
``mindformers_adapter.json`` beside them, where HF PEFT does not look: PEFT warns about every
unknown key of adapter_config.json. The read side merges it back (and still accepts directories
written before it existed, with the keys inside adapter_config.json).
An adapter that HF PEFT cannot hold exactly (e.g. LoKr on a cell fusing q/k/v) is written in
MindFormers' names with no adapter_config.json, its config in the sidecar under ``config`` and
the reason under ``not_peft``: PEFT never sees a directory it would misread, and we read it back.
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
META_NAME = "mindformers_adapter.json"
OURS = "mindformers_"  # prefix of our keys in the config dicts this module reads and writes
PET_TYPE_KEY = OURS + "pet_type"
HF_MAP_KEY = OURS + "hf_map"
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


def split_config(config: dict) -> Tuple[dict, dict]:
    """(what adapter_config.json holds, our ``mindformers_*`` keys without the prefix)."""
    peft = {k: v for k, v in config.items() if not k.startswith(OURS)}
    ours = {k[len(OURS):]: v for k, v in config.items() if k.startswith(OURS)}
    return peft, ours


NOT_PEFT_KEY = OURS + "not_peft"


def write_config_files(directory: str, config: dict) -> None:
    """adapter_config.json (PEFT's keys) and, if any, mindformers_adapter.json (ours) in
    ``directory``; with ``mindformers_not_peft`` set, everything goes to the sidecar."""
    peft, ours = split_config(config)
    if ours.get("not_peft"):
        ours["config"] = peft
    else:
        write_text_atomic(os.path.join(directory, CONFIG_NAME), json.dumps(peft, indent=2, sort_keys=True))
    if ours:
        write_text_atomic(os.path.join(directory, META_NAME), json.dumps(ours, indent=1, sort_keys=True))


def write_adapter_dir(directory: str, tensors: Dict[str, np.ndarray], config: dict,
                      extra: Optional[Callable[[str], None]] = None) -> str:
    """Write ``directory`` atomically (replacing an existing one); returns its path.

    ``tensors`` go to adapter_model.safetensors (PEFT's metadata ``format: pt``), ``config``
    to adapter_config.json and mindformers_adapter.json (see :func:`split_config`);
    ``extra(tmp_dir)`` may add more files before the rename.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.path.basename(directory)}-", dir=parent)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        write_config_files(tmp, config)
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


def read_config(directory: str) -> dict:
    """adapter_config.json with our keys from mindformers_adapter.json merged back (prefixed)."""
    config_path, meta_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, META_NAME)
    if not is_adapter_dir(directory):
        raise AdapterFileError(f"{config_path} is missing: not an adapter directory "
                               f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = {}
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as exc:
            raise AdapterFileError(f"{path} is not valid JSON: {exc}") from exc
        if path == meta_path:
            config.update(data.pop("config", None) or {})
            data = {OURS + k: v for k, v in data.items()}
        config.update(data)
    return config


def is_adapter_dir(directory: str) -> bool:
    """An adapter directory: PEFT's adapter_config.json, or our sidecar holding the config of
    an adapter PEFT cannot hold (``not_peft``)."""
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return True
    try:
        with open(os.path.join(directory, META_NAME), encoding="utf-8") as handle:
            return bool(json.load(handle).get("not_peft"))
    except (OSError, ValueError):
        return False


def read_adapter_dir(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(adapter_config.json dict with our keys merged back, tensors by key) of an adapter directory."""
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    config = read_config(directory)
    if not os.path.isfile(weights_path):
        raise AdapterFileError(f"{weights_path} is missing: not an adapter directory "
                               f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
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
    if is_adapter_dir(path):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as handle:
            target = os.path.join(path, handle.read().strip())
        if is_adapter_dir(target):
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
