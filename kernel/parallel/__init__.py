"""Training on many processes: the world they form, the plan a strategy makes for it,
the memory that plan needs, and the launcher that starts and watches the processes.

The split follows what each part needs: ``world`` and ``plan`` are plain data (no torch),
so ``modelloop plan`` and the launcher decide everything before a worker imports torch;
``memory`` estimates per-device memory from a model built on the meta device; ``launch``
runs torch's elastic agent and turns a failed rank into one clear message.
"""
