"""Data: files -> canonical records -> rendered, tokenised, label-masked, packed examples.

``sources`` reads and mixes files, ``records`` detects formats and validates,
``tokenize`` renders with the chat template and caches token ids, ``packing`` packs
them padding-free. Formats and samplers themselves are plugins (``modelloop.builtin``).
"""
