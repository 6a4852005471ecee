"""Load an uploaded program in the build child, after checking what torch would unpickle.

``torch.export.load`` unpickles archive entries in these places (torch 2.13,
``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py``):

1. weights whose config says ``use_pickle``: ``torch.load(..., weights_only=False)``;
2. tensor constants whose config says ``use_pickle``: the same;
3. ``data/sample_inputs/<model>.pt``: ``deserialize_torch_artifact`` tries
   ``weights_only=True`` and, on any error, retries with ``weights_only=False``;
4. legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt``: same fallback as 3;
5. constants named ``custom_obj_*``: ``torch._C._pickle_load_obj`` (TorchScript unpickler);
6. constants named ``opaque_obj_*``: ``pickle.loads``;
7. ``data/aotinductor/<model>/``: not a pickle, but native code loaded by
   ``AOTIModelPackageLoader``.

How each is covered: 1-3 are listed by ``inspect_archive`` as pickled entries, and each must
load with ``torch.load(weights_only=True)`` into plain tensors and containers; while torch then
loads the program, ``torch.load`` is also forced to ``weights_only=True``, so the full-pickle
calls of 1-3 cannot run a pickle even if a check here were wrong. 4-7 cannot be made safe and
``inspect_archive`` refuses archives that have them. Finally the bytes checked here are read
through torch's own zip reader and must equal what ``inspect_archive`` read through
``zipfile``: a zip that the two parsers read differently is refused.

``weights_only=True`` is a restricted unpickler, not a sandbox (it has had CVEs), so this runs
only in the build child, which has no credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from service.archive import ArchiveInfo, inspect_archive
from service.errors import KilnError

_MAX_DEPTH = 32
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str)


def _not_plain(obj: Any, depth: int = 0) -> str | None:
    """Why ``obj`` is not tensors, numbers and strings in lists/tuples/dicts; None if it is."""
    if depth > _MAX_DEPTH:
        return "nesting is too deep"
    kind = type(obj)
    if kind in _PLAIN_SCALARS:
        return None
    if isinstance(obj, torch.Tensor):
        # Parameter is how weights are saved; any other subclass has its own unpickling hooks.
        if kind not in (torch.Tensor, torch.nn.Parameter):
            return f"tensor subclass {kind.__module__}.{kind.__qualname__}"
        return None
    if kind in (list, tuple):
        for item in obj:
            if reason := _not_plain(item, depth + 1):
                return reason
        return None
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                return f"dict key of type {type(key).__name__}"
            if reason := _not_plain(value, depth + 1):
                return reason
        return None
    return f"{kind.__module__}.{kind.__qualname__} is not a tensor, number or string"


def _unsafe(name: str, reason: str) -> KilnError:
    return KilnError(
        "archive_unsafe_pickle",
        f"archive entry {name!r} is a pickle that is not plain tensors ({reason[:200]}); Kiln "
        "loads only programs whose pickled entries are tensors, numbers and strings. Re-export "
        "with plain tensor weights and example inputs",
        400,
        {"entry": name, "reason": reason[:500]},
    )


def verify_pickled_entries(path: str | os.PathLike[str], info: ArchiveInfo | None = None) -> None:
    """Refuse the archive unless every entry torch would unpickle holds only plain tensors.

    ``info`` is ``inspect_archive(path)`` when the caller already has it.
    """
    if info is None:
        info = inspect_archive(path)
    try:
        reader = torch._C.PyTorchFileReader(os.fspath(path))
        records = set(reader.get_all_records())
    except Exception as exc:  # torch raises RuntimeError subclasses with C++ messages
        raise KilnError("archive_reader_mismatch", "torch's zip reader cannot open the archive "
                        f"that passed inspection ({str(exc)[:200]})", 400,
                        {"reason": str(exc)[:500]}) from None
    expected = dict(info.entry_sha256)
    records = {r for r in records if not r.endswith("/")}
    if records != set(expected):
        differ = sorted(records.symmetric_difference(expected))
        raise KilnError("archive_reader_mismatch", "torch's zip reader sees other entries than "
                        "Python's zipfile; such archives are refused", 400,
                        {"entries": differ[:20]})
    for name, digest in expected.items():
        data = reader.get_record(name)
        if hashlib.sha256(data).hexdigest() != digest:
            raise KilnError("archive_reader_mismatch", f"torch's zip reader reads entry {name!r} "
                            "differently from Python's zipfile; such archives are refused", 400,
                            {"entry": name})
        if name not in info.pickled_entries:
            continue
        try:
            # map_location: the verdict is about what the pickle calls, not where tensors live;
            # a GPU-saved example input must not read as unsafe on a CPU worker.
            obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise _unsafe(name, str(exc) or type(exc).__name__) from None
        if reason := _not_plain(obj):
            raise _unsafe(name, reason)


@contextlib.contextmanager
def _torch_load_weights_only() -> Iterator[None]:
    """Force every ``torch.load`` to ``weights_only=True`` for the duration.

    torch.export.load calls ``torch.load(..., weights_only=False)`` for entries the archive marks
    as pickled; this makes those calls restricted too. The build child is single-threaded
    around the load, so swapping a module attribute is safe there.
    """
    original = torch.load

    def restricted(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(f, *args, **kwargs)

    torch.load = restricted
    try:
        yield
    finally:
        torch.load = original


def load_program(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """Inspect, verify, then ``torch.export.load`` an uploaded program. KilnError to refuse."""
    info = inspect_archive(path)
    verify_pickled_entries(path, info)
    with _torch_load_weights_only():
        try:
            return torch.export.load(os.fspath(path))
        except Exception as exc:
            raise KilnError("program_load_failed", f"torch could not load the program: "
                            f"{str(exc)[:300]}", 400,
                            {"reason": str(exc)[:1000], "type": type(exc).__name__}) from exc
