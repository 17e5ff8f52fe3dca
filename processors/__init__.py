"""Stream processors: the Faust app (`faust -A processors worker`), inference, the sink.

`app` is resolved lazily so that importing a submodule (the inference consumer,
the sink) does not build the Faust app or import Faust.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from processors.app import app

        # Importing the submodule bound `processors.app` to the module; Faust's
        # `-A processors` wants the App under that name.
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'processors' has no attribute {name!r}")
