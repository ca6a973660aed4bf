"""Runs one of llama.cpp's converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``)
from a llama.cpp source folder, in a process of its own:

    python -m modelloop_gguf_convert LLAMA_CPP SCRIPT SETTINGS.json [converter arguments...]

``SETTINGS.json`` says what the converter cannot know:

- ``pre_tokenizer``: llama.cpp names a BPE pre-tokenizer by the hash of what the tokenizer
  makes of a test text, which only a released vocabulary has. A tokenizer trained here (or
  a vocabulary extended) splits text with its family's rule but has no known hash; it gets
  that rule's llama.cpp name instead of the converter's refusal. A known hash still wins.
- ``chat_template`` and ``end_of_turn_id``: the template the run was trained with, and the
  token that ends an assistant turn, written as the GGUF's ``tokenizer.chat_template`` and
  end-of-turn (``eot``) token, so llama.cpp stops where the model was trained to.

The converters are llama.cpp's own, run unchanged; this only sets those three things on
the way (the converter's ``gguf-py`` comes from the same folder, as the converter itself
arranges unless ``NO_LOCAL_GGUF`` is set).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any


def _name_unknown_pre_tokenizer(name: str) -> None:
    from conversion.base import TextModel

    recognise = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def _write_chat_settings(chat_template: str | None, end_of_turn_id: int | None) -> None:
    from gguf import SpecialVocab

    add_to_gguf = SpecialVocab.add_to_gguf

    def with_chat_settings(self: Any, writer: Any, quiet: bool = False) -> None:
        if chat_template is not None:
            self.chat_template = chat_template
        if end_of_turn_id is not None and self.special_token_ids.get("eos") != end_of_turn_id:
            self.special_token_ids["eot"] = end_of_turn_id
        add_to_gguf(self, writer, quiet)

    SpecialVocab.add_to_gguf = with_chat_settings


def main(argv: list[str]) -> None:
    llama_cpp, script, settings_file, *arguments = argv
    settings = json.loads(Path(settings_file).read_text())
    sys.path[:0] = [str(Path(llama_cpp) / "gguf-py"), llama_cpp]
    if settings.get("pre_tokenizer"):
        _name_unknown_pre_tokenizer(settings["pre_tokenizer"])
    _write_chat_settings(settings.get("chat_template"), settings.get("end_of_turn_id"))
    sys.argv = [script, *arguments]
    runpy.run_path(str(Path(llama_cpp) / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
