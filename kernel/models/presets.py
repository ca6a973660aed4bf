"""Architecture presets shared by model families.

``TINY`` is the shape the tests, the quickstart and the training benchmark use (the
peer baseline's model: about 3.3 M parameters with a 2k vocabulary): small enough to
train in seconds on a CPU, with every part of a real decoder (GQA, RoPE, SwiGLU, tied
embeddings). Families add their own fields (``model_type``, ``head_dim``, ...).
"""

from __future__ import annotations

TINY = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "tokenizer_vocab": 2000,
}

#: About 24 M parameters: big enough that a run's memory is its tensors rather than the
#: libraries around them (the memory planner's tests and ``bench/parallel_throughput.py``
#: measure with it), still a few seconds a step on a CPU.
SMALL = {
    **TINY,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
