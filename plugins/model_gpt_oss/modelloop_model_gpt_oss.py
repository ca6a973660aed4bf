"""gpt-oss: OpenAI's open-weight mixture-of-experts models (gpt-oss-20b, gpt-oss-120b), and
their chat format, harmony.

Harmony messages are ``<|start|>ROLE<|message|>TEXT<|end|>``; the assistant writes on a
channel (``analysis`` for its reasoning, ``final`` for the answer, ``commentary`` for
tool calls addressed ``to=functions.NAME`` and ended by ``<|call|>``), and ends its final
answer with ``<|return|>``. A system message carries the model identity, the knowledge
cutoff, the date and the reasoning effort; the user's system prompt and the tool
definitions (as TypeScript types) go in a developer message.

The experts are fused parameters with biases (32 experts, 4 routed, in gpt-oss-20b),
which LoRA targets directly. Nothing heavy is imported.
"""

from __future__ import annotations

from typing import Any

from modelloop.plugin import ChatTemplate, ModelFamily, ModelloopError, TokenizerRecipe, ToolCallFormat, hookimpl

PLUGIN_API = ">=1.6,<2"  # the versions of modelloop.plugin this plugin is written against

#: o200k's pre-tokenizer split (cased words with their contractions, digits in threes).
O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Who the published template says the model is, unless told otherwise (``model_identity``).
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."

HARMONY_TOKENIZER = TokenizerRecipe(
    split_regex=O200K_SPLIT,
    nfc=False,
    special_tokens=(
        "<|startoftext|>",
        "<|endoftext|>",
        "<|return|>",
        "<|constrain|>",
        "<|channel|>",
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|call|>",
    ),
    eos_token="<|return|>",
    pad_token="<|endoftext|>",
    bos_token="<|startoftext|>",
)

#: A JSON schema as a TypeScript type, the way gpt-oss reads tool parameters (a nested
#: object's members and a union's alternatives start on a new line, as the published
#: template lays them out).
_TYPESCRIPT = """
{%- macro ts_type(spec) -%}
{%- set kind = spec['type'] -%}
{%- if kind == 'array' -%}
  {%- set item = spec['items'] -%}
  {%- if not item -%}any[]
  {%- elif item['type'] in ('string', 'boolean') -%}{{ item['type'] }}[]
  {%- elif item['type'] in ('number', 'integer') -%}number[]
  {%- else -%}
    {%- set inner = ts_type(item) -%}
    {{- 'any[]' if inner == 'object | object' or inner | length > 50 else inner + '[]' -}}
  {%- endif -%}
  {{- ' | null' if spec['nullable'] else '' -}}
{%- elif kind is sequence and kind is not string and kind is not mapping and kind -%}{{ kind | join(' | ') }}
{%- elif spec['oneOf'] -%}
  {%- for variant in spec['oneOf'] -%}
    {{- ts_type(variant) -}}
    {{- '// ' + variant['description'] if variant['description'] else '' -}}
    {{- '                    // default: ' + variant['default'] | tojson if variant['default'] is defined else '' -}}
    {{- '' if loop.last else ' | \\n' -}}
  {%- endfor -%}
{%- elif kind == 'string' and spec['enum'] -%}"{{ spec['enum'] | join('" | "') }}"
{%- elif kind == 'string' -%}string{{ ' | null' if spec['nullable'] else '' }}
{%- elif kind in ('number', 'integer') -%}number
{%- elif kind == 'boolean' -%}boolean
{%- elif kind == 'object' and spec['properties'] -%}
  {{- '{\\n' -}}
  {%- for name, member in spec['properties'].items() -%}
    {{- name + ('' if name in (spec['required'] or []) else '?') + ': \\n                ' + ts_type(member) -}}
    {{- '' if loop.last else ', ' -}}
  {%- endfor -%}
  {{- '}' -}}
{%- elif kind == 'object' -%}object
{%- else -%}any
{%- endif -%}
{%- endmacro -%}
"""

#: The developer message's tool section: a ``functions`` namespace of typed functions.
_TOOLS = """
{%- macro functions(tools) -%}
{{- '## functions\\n\\nnamespace functions {\\n\\n' -}}
{%- for tool in tools -%}
  {%- set tool = tool['function'] if tool['function'] is defined else tool -%}
  {%- set parameters = tool['parameters'] or {} -%}
  {{- '// ' + (tool['description'] or '') + '\\ntype ' + tool['name'] + ' = ' -}}
  {%- if parameters['properties'] -%}
    {{- '(_: {\\n' -}}
    {%- for name, spec in parameters['properties'].items() -%}
      {{- '// ' + spec['description'] + '\\n' if spec['description'] else '' -}}
      {{- name + ('' if name in (parameters['required'] or []) else '?') + ': ' + ts_type(spec) -}}
      {%- if spec['default'] is defined and spec['enum'] -%}{{ ', // default: ' + spec['default'] }}
      {%- elif spec['default'] is defined and spec['oneOf'] -%}{{ '// default: ' + spec['default'] }}
      {%- elif spec['default'] is defined -%}{{ ', // default: ' + spec['default'] | tojson }}
      {%- endif -%}
      {{- ',\\n' -}}
    {%- endfor -%}
    {{- '}) => any;\\n\\n' -}}
  {%- else -%}
    {{- '() => any;\\n\\n' -}}
  {%- endif -%}
{%- endfor -%}
{{- '} // namespace functions' -}}
{%- endmacro -%}
"""

HARMONY_SOURCE = (
    _TYPESCRIPT
    + _TOOLS
    + """
{%- set first = messages[0] if messages else {} -%}
{%- set instructions = first['content'] if first['role'] in ('system', 'developer') else '' -%}
{%- set turns = messages[1:] if first['role'] in ('system', 'developer') else messages -%}
{%- set identity = model_identity if model_identity is defined else '"""
    + MODEL_IDENTITY
    + """' -%}
{%- set effort = reasoning_effort if reasoning_effort is defined else 'medium' -%}
{%- set date = current_date if current_date is defined and current_date else strftime_now('%Y-%m-%d') -%}
{{- '<|start|>system<|message|>' + identity + '\\nKnowledge cutoff: 2024-06\\nCurrent date: ' + date -}}
{{- '\\n\\nReasoning: ' + effort + '\\n\\n' -}}
{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}
{{- \"\\nCalls to these tools must go to the commentary channel: 'functions'.\" if tools else '' -}}
{{- '<|end|>' -}}
{%- if instructions or tools -%}
  {{- '<|start|>developer<|message|>' -}}
  {{- '# Instructions\\n\\n' + instructions + '\\n\\n' if instructions else '' -}}
  {{- '# Tools\\n\\n' + functions(tools) if tools else '' -}}
  {{- '<|end|>' -}}
{%- endif -%}
{%- set ns = namespace(call=none) -%}
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {{- '<|start|>user<|message|>' + message['content'] + '<|end|>' -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- set analysis = message['thinking'] if 'thinking' in message and message['thinking'] is string else none -%}
    {%- if message['tool_calls'] -%}
      {%- if message['tool_calls'] | length > 1 -%}
        {{- raise_exception('harmony takes one tool call per assistant message; split them into one message each') -}}
      {%- elif message['content'] and analysis -%}
        {{- raise_exception('a tool call has its reasoning in content or in thinking, not both') -}}
      {%- endif -%}
      {%- set analysis = analysis or message['content'] or none -%}
    {%- endif -%}
    {{- '<|start|>assistant<|channel|>analysis<|message|>' + analysis + '<|end|>' if analysis is string else '' -}}
    {%- if message['tool_calls'] -%}
      {%- set call = message['tool_calls'][0] -%}
      {%- set call = call['function'] if call['function'] is defined else call -%}
      {{- '<|start|>assistant to=functions.' + call['name'] + '<|channel|>commentary ' -}}
      {{- (call['content_type'] or 'json') + '<|message|>' -}}
      {{- (call['arguments'] if call['arguments'] is string else call['arguments'] | tojson) + '<|call|>' -}}
      {%- set ns.call = call['name'] -%}
    {%- else -%}
      {{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|return|>' -}}
      {%- set ns.call = none -%}
    {%- endif -%}
  {%- elif message['role'] == 'tool' -%}
    {%- if ns.call is none -%}
      {{- raise_exception('a tool message must follow the assistant message that called the tool') -}}
    {%- endif -%}
    {{- '<|start|>functions.' + ns.call + ' to=assistant<|channel|>commentary<|message|>' -}}
    {{- message['content'] | tojson + '<|end|>' -}}
  {%- else -%}
    {{- raise_exception('harmony has no ' + message['role'] + ' message after the first one') -}}
  {%- endif -%}
{%- endfor -%}
{{- '<|start|>assistant' if add_generation_prompt else '' -}}
"""
)

HARMONY_TEMPLATE = ChatTemplate(
    name="harmony",
    description="gpt-oss harmony: channels, <|return|> ends a final answer, <|call|> a tool call",
    aliases=("gpt_oss",),
    source=HARMONY_SOURCE,
    end_of_turn=("<|return|>", "<|call|>"),
    # one call per message, addressed in its header: `` to=functions.NAME<|channel|>commentary json<|message|>{...}<|call|>``
    tool_calls=ToolCallFormat(
        pattern=r"to=functions\.(?P<name>[^\s<]+)[^<]*(?:<\|channel\|>[^<]*)?<\|message\|>(?P<arguments>.*?)(?:<\|call\|>|\Z)"
    ),
    options={
        "reasoning_effort": "medium",
        "model_identity": MODEL_IDENTITY,
        "current_date": None,  # YYYY-MM-DD; None: today's, as the published template renders it
    },
)


def load(path: str, *, config: Any, **options: Any) -> tuple[Any, None]:
    """The model as transformers loads it, its layers' attention masks built from the
    position ids (``_packed_masks``); the kernel loads the tokenizer."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **options)
    except OSError as error:
        raise ModelloopError(f"{path}: cannot load the weights ({error})") from None
    model.get_decoder().register_forward_pre_hook(_packed_masks, with_kwargs=True)
    return model, None


def _packed_masks(decoder: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Packed rows (position ids restarting at 0 at each example, no attention mask) keep
    their examples apart. transformers (5.24) builds gpt-oss's masks without the position
    ids, so every packed example would see the ones before it; here the masks are built as
    the other families' models build theirs, with the position ids, and handed in ready."""
    cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    if args or cached or kwargs.get("attention_mask") is not None or kwargs.get("position_ids") is None:
        return None
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = decoder.embed_tokens(kwargs["input_ids"])
    mask = {
        "config": decoder.config,
        "inputs_embeds": embeds,
        "attention_mask": None,
        "cache": None,
        "position_ids": kwargs["position_ids"],
    }
    masks = {
        "full_attention": create_causal_mask(**mask),
        "sliding_attention": create_sliding_window_causal_mask(**mask),
    }
    return args, {**kwargs, "input_ids": None, "inputs_embeds": embeds, "attention_mask": masks}


FAMILY = ModelFamily(
    name="gpt_oss",
    description="gpt-oss-20b and gpt-oss-120b (attention sinks, routed experts with biases)",
    model_types=("gpt_oss",),
    aliases=("gpt-oss",),
    template="harmony",
    load=load,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    module_groups={
        "embeddings": ("model.embed_tokens",),
        "language_model": ("model.layers", "model.norm"),
        "lm_head": ("lm_head",),
    },
    presets={
        "tiny": {
            "model_type": "gpt_oss",
            "hidden_size": 256,
            "intermediate_size": 256,
            "num_hidden_layers": 2,  # a sliding-window layer, then a full one
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 128,
            "max_position_embeddings": 2048,
            "rope_parameters": {  # YaRN over a short original context, 32 times as gpt-oss
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": True,
            "tokenizer_vocab": 2000,
        },
        "gpt-oss-20b": {
            "model_type": "gpt_oss",
            "vocab_size": 201088,
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_hidden_layers": 24,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "sliding_window": 128,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
            "rms_norm_eps": 1e-5,
            "swiglu_limit": 7.0,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "tokenizer_vocab": 8000,
        },
    },
    tokenizer=HARMONY_TOKENIZER,
)


@hookimpl
def register_templates(register):
    register(HARMONY_TEMPLATE)


@hookimpl
def register_models(register):
    register(FAMILY)
