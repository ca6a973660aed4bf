"""``modelloop ui``: the runs, their lineage and curves, launching stages and a chat
playground in the browser (``modelloop.ui.app``)."""
