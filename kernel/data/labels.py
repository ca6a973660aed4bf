"""The label of a token the loss leaves out: torch's and transformers' ``ignore_index``.

Tokenising, image tokens, packing, the trainer and the output layer's loss all write or
read it; it lives alone so that none of them imports another for one number.
"""

IGNORE = -100
