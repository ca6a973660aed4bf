"""modelloop: carry an open language model around the fine-tuning loop.

The kernel is small: the hook contract (``modelloop.hooks``), the plugin manager
(``modelloop.plugins``), typed registries (``modelloop.registry``) and the stages that
compose the libraries made for each job. Model families, tuners, rewards and engines
are plugins. Importing this package imports nothing heavy.
"""

from modelloop.hooks import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
