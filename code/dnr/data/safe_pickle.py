"""Load a pickled feature file without letting it run code.

Unpickling calls whatever callables the file names (`os.system`, `builtins.eval`, ...), so a
feature file from the internet is a program. `safe_load` admits only what feature files are made
of: dicts, lists, tuples, strings, bytes, numbers, booleans, None (pickle builds those itself) and
numpy arrays, dtypes and scalars (numpy's own reconstruction helpers, and `_codecs.encode`, which
pickle protocols 0-2 use to store bytes). Any other global the file names is refused before it is
imported or called, with an error naming it.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Tuple


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file names a global outside the allowed set. A ValueError too, so the trainer
    reports it as a bad input rather than a crash."""


def _numpy_core(submodule: str):
    # numpy >= 2 keeps the internals in numpy._core (and writes that name into pickles);
    # numpy 1.x uses numpy.core. Files written by either must load under either.
    for name in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"numpy has neither numpy._core.{submodule} nor numpy.core.{submodule}")


def _allowed() -> Dict[Tuple[str, str], Callable]:
    import codecs

    import numpy as np

    multiarray = _numpy_core("multiarray")
    numeric = _numpy_core("numeric")
    table = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        table[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` only hands out the numpy/bytes helpers above."""

    def __init__(self, file, source: str = "<pickle>"):
        # latin1: numpy arrays pickled by Python 2 store their bytes as str (numpy's documented way).
        super().__init__(file, encoding="latin1")
        self.source = source
        self.allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused to load: the pickle asks for {module}.{name}, and only numpy "
                f"arrays, lists, dicts, strings and numbers are admitted (a feature file needs nothing "
                f"else; loading it with plain pickle would call or import {module}.{name})"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused to load: the pickle uses persistent ids ({pid!r})")


def safe_load(path) -> Any:
    """Unpickle `path` with `RestrictedUnpickler`. A missing file raises FileNotFoundError; a file
    that is not a pickle, or is truncated, a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=str(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ImportError, AttributeError, IndexError, TypeError,
                UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
