"""Plugins that ship with the kernel, registered through the same hooks as any other.

Each module listed in ``modelloop.plugins.BUILTIN_PLUGINS`` is one plugin.
"""
