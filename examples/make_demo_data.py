"""Write the demo data sets: small tasks a tiny model can visibly learn, in every format.

  tasks.jsonl        messages: 2-digit addition and string reversal (train)
  tasks_eval.jsonl   messages: held-out questions of the same tasks
  tasks_alpaca.jsonl the train set as alpaca records
  preference.jsonl   prompt + chosen (right) / rejected (wrong) answers
  prompts.jsonl      prompt-only records with a `solution` column, for GRPO rewards
  sums.jsonl         messages: the 100 single-digit additions (the quickstart's task)
  sum_prompts.jsonl  the same 100 questions as prompts with a `solution`, for GRPO and eval
  images/            16 pictures: a red, green, blue or yellow square or circle, 64 or 96 px
  shapes.jsonl       messages with image parts (what color, which shape), mixed with text sums
  shapes_sharegpt.jsonl  the same pictures as sharegpt records with <image> and an images column

A tiny model fresh from ``new-model`` learns the single-digit sums in a few hundred
steps at a constant learning rate (its loss sits at the uniform prior over the digits for
a while, then drops); 2-digit sums and string reversal take it far longer.

Deterministic for a seed. Usage: python examples/make_demo_data.py [OUT_DIR] [--count N]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path


def task(rng: random.Random) -> tuple[str, str, str]:
    """A question, its answer, and a plausible wrong answer."""
    if rng.random() < 0.5:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a}+{b}?", str(a + b), str(a + b + rng.choice([-10, -1, 1, 10]))
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    wrong = word if word != word[::-1] else word + "x"
    return f"Reverse the string: {word}", word[::-1], wrong


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def shapes(out: Path, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Draw the pictures; return the image-and-text conversations (messages, with text-only
    sums mixed in a third of the time) and their sharegpt form."""
    from PIL import Image, ImageDraw

    (out / "images").mkdir(exist_ok=True)
    messages, sharegpt = [], []
    for color, rgb in COLORS.items():
        for shape in ("square", "circle"):
            for size in (64, 96):
                name = f"images/{color}-{shape}-{size}.png"
                picture = Image.new("RGB", (size, size), (245, 245, 245))
                margin = size // 6
                draw = ImageDraw.Draw(picture)
                (draw.rectangle if shape == "square" else draw.ellipse)(
                    [margin, margin, size - margin, size - margin], fill=rgb
                )
                picture.save(out / name)
                for question, answer in (
                    ("What color is the shape?", color),
                    ("Which shape is this?", f"a {color} {shape}"),
                ):
                    parts = [{"type": "image", "image": name}, {"type": "text", "text": question}]
                    messages.append(
                        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}
                    )
                    turns = [{"from": "human", "value": f"<image>{question}"}, {"from": "gpt", "value": answer}]
                    sharegpt.append({"conversations": turns, "images": [name]})
    for _ in range(len(messages) // 2):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        messages.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": str(a + b)},
                ]
            }
        )
    rng.shuffle(messages)
    return messages, sharegpt


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the demo data sets.")
    parser.add_argument("out", nargs="?", default="runs/data", type=Path)
    parser.add_argument("--count", type=int, default=2000, help="training examples")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    rng = random.Random(arguments.seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < arguments.count + arguments.count // 10:
        question, answer, wrong = task(rng)
        if question not in seen:
            seen.add(question)
            rows.append((question, answer, wrong))
    train, held_out = rows[: arguments.count], rows[arguments.count :]

    def conversation(question: str, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    arguments.out.mkdir(parents=True, exist_ok=True)
    write(arguments.out / "tasks.jsonl", [conversation(q, a) for q, a, _ in train])
    write(arguments.out / "tasks_eval.jsonl", [conversation(q, a) for q, a, _ in held_out])
    write(arguments.out / "tasks_alpaca.jsonl", [{"instruction": q, "input": "", "output": a} for q, a, _ in train])
    write(
        arguments.out / "preference.jsonl", [{"prompt": q, "chosen": a, "rejected": w} for q, a, w in train if a != w]
    )
    write(arguments.out / "prompts.jsonl", [{"prompt": q, "solution": a} for q, a, _ in train])
    sums = [(f"What is {a}+{b}?", str(a + b)) for a in range(10) for b in range(10)]
    write(arguments.out / "sums.jsonl", [conversation(q, a) for q, a in sums])
    write(arguments.out / "sum_prompts.jsonl", [{"prompt": q, "solution": a} for q, a in sums])
    pictured, pictured_sharegpt = shapes(arguments.out, rng)
    write(arguments.out / "shapes.jsonl", pictured)
    write(arguments.out / "shapes_sharegpt.jsonl", pictured_sharegpt)
    print(
        f"{arguments.out}: {len(train)} train, {len(held_out)} held-out examples, {len(sums)} single-digit sums, "
        f"{len(pictured)} picture questions in 9 files"
    )


if __name__ == "__main__":
    main()
