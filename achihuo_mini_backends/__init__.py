"""The builtin backends of achihuo_mini: ``memory``, ``sqlite`` and ``redis``.

Each module is a pluggy plugin registered under the ``achihuo_mini`` entry-point
group in ``pyproject.toml`` -- the same path a third-party backend package takes.
Nothing here is imported by the core.
"""
