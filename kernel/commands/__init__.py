"""One module per CLI command, imported only when that command runs (see ``modelloop.cli``)."""
