"""CorDA's ``cache_file`` (the cropped decompositions) and ``covariance_file`` (the input
covariances), as safetensors files keyed by our cell names (PEFT's hold the same tensors, under
its module names, written by ``torch.save``; they are not read here).

Keys: ``<cell>.eigens.S_WC`` [r], ``.U_WC`` [out, r], ``.V_WC`` [in, r] (float64); ``<cell>`` [in, in]
(float64) for covariances. A file that exists is read instead of computing; one named but
missing is written (rank 0 only, atomically) once computed.
"""
import os
from typing import Dict, Optional

import numpy as np

from mindformers_lora_ext.data_init.corda import Eigens

_PARTS = ("S_WC", "U_WC", "V_WC")


def _exists(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(path) and os.path.getsize(path) > 0


def _read(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(path)


def write_arrays(path: Optional[str], arrays: Dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (nothing if ``path`` is None or not rank 0)."""
    if not path:
        return
    # pylint: disable=import-outside-toplevel
    from safetensors.numpy import save_file
    from mindformers.tools.utils import get_real_rank
    if get_real_rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: np.ascontiguousarray(v, np.float64) for k, v in arrays.items()}, tmp)
    os.replace(tmp, path)


def write_eigens(path: Optional[str], found: Dict[str, Eigens]) -> None:
    """Write the decompositions of every cell to ``path`` (if given)."""
    write_arrays(path, {f"{cell}.eigens.{part}": value for cell, e in found.items()
                        for part, value in zip(_PARTS, (e.s, e.u, e.v))})


def read_eigens(path: Optional[str], layers: Dict[str, object]) -> Optional[Dict[str, Eigens]]:
    """The decompositions in ``path`` for every cell of ``layers``, or None if there is no such
    file; raises naming the first cell the file lacks or holds at another rank or size."""
    if not _exists(path):
        return None
    arrays = _read(path)
    out = {}
    for cell, layer in layers.items():
        keys = [f"{cell}.eigens.{part}" for part in _PARTS]
        if any(key not in arrays for key in keys):
            raise ValueError(f"corda_config.cache_file {path} has no decomposition of {cell!r}: built for "
                             f"other target_modules? Delete it to rebuild")
        s, u, v = (arrays[key].astype(np.float64) for key in keys)
        expected = ((layer.configured_rank,), (layer.out_channels, layer.configured_rank),
                    (layer.in_channels, layer.configured_rank))
        if (s.shape, u.shape, v.shape) != expected:
            raise ValueError(f"corda_config.cache_file {path}: {cell!r} holds S/U/V of shapes "
                             f"{s.shape}/{u.shape}/{v.shape}, this model needs {expected[0]}/{expected[1]}/"
                             f"{expected[2]} (built for another rank or model?). Delete it to rebuild")
        out[cell] = Eigens(s, u, v)
    return out


def read_covariances(path: Optional[str], layers: Dict[str, object]) -> Optional[Dict[str, np.ndarray]]:
    """The covariance of every cell of ``layers`` in ``path``, or None if there is no such file."""
    if not _exists(path):
        return None
    arrays = _read(path)
    out = {}
    for cell, layer in layers.items():
        if cell not in arrays or arrays[cell].shape != (layer.in_channels, layer.in_channels):
            raise ValueError(f"corda_config.covariance_file {path} has no [{layer.in_channels}, "
                             f"{layer.in_channels}] covariance for {cell!r}. Delete it to rebuild")
        out[cell] = arrays[cell].astype(np.float64)
    return out
