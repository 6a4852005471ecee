"""Kiln's Python client: compile a PyTorch module on a Kiln server, load engines safely.

    import kiln, torch
    engine = kiln.compile(model, inputs=[kiln.Input(min_shape=[1, 3, 224, 224],
                                                    opt_shape=[4, 3, 224, 224],
                                                    max_shape=[8, 3, 224, 224])],
                          server="http://kiln:8000")
    y = engine(x)                       # checked against the engine's profile
    engine = kiln.load("model.pt2")     # any Kiln engine file, profile enforced

Importing kiln needs only requests (torch is imported when compiling or loading).
"""

from importlib import metadata as _metadata

from kiln.client import KilnAPIError, KilnClient
from kiln.compiler import CompileStats, Input, compile
from kiln.loader import LoadedEngine, ProfileError, load

Client = KilnClient
try:
    __version__ = _metadata.version("kiln")
except _metadata.PackageNotFoundError:  # run from a source tree without an install
    __version__ = "0.0.0+source"

__all__ = ["Client", "CompileStats", "Input", "KilnAPIError", "KilnClient", "LoadedEngine",
           "ProfileError", "__version__", "compile", "load"]
