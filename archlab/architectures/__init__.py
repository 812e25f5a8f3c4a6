"""The model zoo: one module per architecture plus the lazy registry (see registry.py)."""

from archlab.architectures.registry import (  # noqa: F401  (re-exported API)
    ArchSpec,
    UnknownArchitectureError,
    build_model,
    get_spec,
    list_specs,
    load_module,
    make_config,
)
