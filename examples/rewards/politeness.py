"""A team's own GRPO reward: ``--reward examples/rewards/politeness.py:score``."""


def score(prompts, completions, *, bonus=1.0, **columns):
    """``bonus`` for an answer that says please or thank you, else 0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [bonus if any(word in text.lower() for word in ("please", "thank you")) else 0.0 for text in texts]
