"""``nec-serve``: the command line, composing the core, models, export, wrapper and controller."""

__all__: list[str] = []
