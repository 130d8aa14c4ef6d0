"""What the optional parts of the benchmark need beyond torch and this package: each part (a peer, the model,
the training step, the deployment runtimes) is skipped with one line saying why when a module it needs cannot
be imported, so a missing package never ends the run."""

from __future__ import annotations

import importlib

INSTALL_HINT = "bash scripts/bench.sh installs it (the 'bench' extra: pip install -e '.[bench]')"


def missing(modules, hint: str = INSTALL_HINT) -> str | None:
    """None when every module in `modules` imports, else why the first one that does not cannot."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            return f"{module} cannot be imported ({error}); {hint}"
    return None
