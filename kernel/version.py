"""The kernel's version, in a module of its own.

Run records, the token cache key and the plugin manager's range checks all read it, and
they sit below the package's ``__init__`` (which imports the stages for ``modelloop.sft``
and friends): reading it from there would make every one of them depend on the stages.
"""

__version__ = "0.1.0"
