"""DeepSeek model families: DeepSeek-V3 (V3, V3-0324, V3.1, R1) and DeepSeek-V2 (V2, V2-Lite).

Both are mixture-of-experts decoders with multi-head latent attention (MLA): queries go
through a low-rank ``q_a_proj`` / ``q_b_proj`` pair (or one ``q_proj`` where a model has
no query rank, as V2-Lite), keys and values through ``kv_a_proj_with_mqa`` into a
compressed latent and back out through ``kv_b_proj``. The first layers have a dense MLP,
the others routed experts (fused into two parameters in transformers) plus shared
experts. Layer names, released shapes and chat formats are those of the published
models and of transformers' DeepSeek classes. Nothing heavy is imported.
"""

from __future__ import annotations

from modelloop.plugin import TINY, ChatTemplate, ModelFamily, TokenizerRecipe, ToolCallFormat, hookimpl

PLUGIN_API = ">=1.6,<2"  # the versions of modelloop.plugin this plugin is written against

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

#: DeepSeek's pre-tokenizer splits digits in threes, CJK runs, letters with their marks and
#: punctuation runs (three Split steps in its tokenizer.json, one alternation here).
DEEPSEEK_SPLIT = (
    r"\p{N}{1,3}|[一-龥぀-ゟ゠-ヿ]+|[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEEPSEEK_V3_TOKENIZER = TokenizerRecipe(
    split_regex=DEEPSEEK_SPLIT,
    nfc=False,
    special_tokens=(
        BOS,
        EOS,
        "<｜▁pad▁｜>",
        "<｜User｜>",
        "<｜Assistant｜>",
        "<think>",
        "</think>",
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
        "<｜tool▁outputs▁begin｜>",
        "<｜tool▁outputs▁end｜>",
        "<｜tool▁output▁begin｜>",
        "<｜tool▁output▁end｜>",
    ),
    eos_token=EOS,
    pad_token="<｜▁pad▁｜>",
    bos_token=BOS,
)
DEEPSEEK_V2_TOKENIZER = TokenizerRecipe(
    split_regex=DEEPSEEK_SPLIT, nfc=False, special_tokens=(BOS, EOS), eos_token=EOS, bos_token=BOS
)

# --------------------------------------------------------------------------- chat templates

#: Every system message, joined by a blank line, right after the BOS token (V3 and V3.1).
_SYSTEM = (
    "{%- set ns = namespace(system='', first=true, after_tool=false, outputs_open=false, last_user=false) %}"
    "{%- for message in messages if message['role'] == 'system' %}"
    "{%- set ns.system = message['content'] if ns.first else ns.system + '\\n\\n' + message['content'] %}"
    "{%- set ns.first = false %}"
    "{%- endfor %}"
    "{{- bos_token + ns.system }}"
)

#: A call's function and its arguments: a JSON string as it is, a mapping as JSON.
_CALL = (
    "{%- set function = call['function'] if call['function'] is defined else call %}"
    "{%- set arguments = function['arguments'] if function['arguments'] is string"
    " else function['arguments'] | tojson %}"
)

#: V3: tool calls as ``function<｜tool▁sep｜>name`` and fenced JSON, results between
#: ``<｜tool▁outputs▁begin｜>`` and ``<｜tool▁outputs▁end｜>``, after which the answer follows
#: without a new ``<｜Assistant｜>``.
DEEPSEEK_V3_SOURCE = (
    _SYSTEM + "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set ns.after_tool = false %}"
    "{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<｜tool▁outputs▁end｜>' if ns.after_tool else '<｜Assistant｜>' }}"
    "{{- (message['content'] or '') + '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in message['tool_calls'] %}"
    + _CALL
    + "{{- ('' if loop.first else '\\n') + '<｜tool▁call▁begin｜>' + (call['type'] or 'function')"
    " + '<｜tool▁sep｜>' + function['name'] + '\\n```json\\n' + arguments + '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor %}"
    "{{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- set ns.after_tool = false %}{%- set ns.outputs_open = false %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ('<｜tool▁outputs▁end｜>' if ns.after_tool else '<｜Assistant｜>') + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- set ns.after_tool = false %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- ('\\n' if ns.outputs_open else '<｜tool▁outputs▁begin｜>')"
    " + '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- set ns.after_tool = true %}{%- set ns.outputs_open = true %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if ns.after_tool %}{{- '<｜tool▁outputs▁end｜>' }}"
    "{%- elif add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
)

#: V3.1's hybrid format: ``</think>`` opens an answer, ``<think>`` a reasoning (with
#: ``thinking``); tool calls as ``name<｜tool▁sep｜>arguments``, results one after another.
DEEPSEEK_V31_SOURCE = (
    _SYSTEM + "{%- for message in messages %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if message['role'] == 'assistant' and thinking and ns.last_user %}"
    "{%- set content = content[7:] if content.startswith('<think>') else content %}"
    "{%- set content = content if '</think>' in content else '</think>' + content %}"
    "{%- elif message['role'] == 'assistant' and '</think>' in content and not message['tool_calls']"
    " and not ns.after_tool %}"
    "{%- set content = content.split('</think>', 1)[1] %}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set ns.after_tool = false %}{%- set ns.last_user = true %}"
    "{{- '<｜User｜>' + content }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if ns.last_user %}{{- '<｜Assistant｜>' + ('<think>' if thinking else '</think>') }}{%- endif %}"
    "{%- if message['tool_calls'] %}"
    "{{- content + '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in message['tool_calls'] %}"
    + _CALL
    + "{{- '<｜tool▁call▁begin｜>' + function['name'] + '<｜tool▁sep｜>' + arguments + '<｜tool▁call▁end｜>' }}"
    "{%- endfor %}"
    "{{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- else %}{{- content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- set ns.after_tool = false %}{%- set ns.last_user = false %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- set ns.after_tool = true %}{%- set ns.last_user = false %}"
    "{{- '<｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and ns.last_user %}"
    "{{- '<｜Assistant｜>' + ('<think>' if thinking else '</think>') }}"
    "{%- endif %}"
)

DEEPSEEK_V2_SOURCE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' and not message['tool_calls'] %}"
    "{{- 'Assistant: ' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- else %}{{- raise_exception('the deepseek_v2 template has no tool turns') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

DEEPSEEK_V3_TEMPLATE = ChatTemplate(
    name="deepseek_v3",
    description="DeepSeek-V3: <｜User｜>/<｜Assistant｜> turns ended by <｜end▁of▁sentence｜>, fenced JSON tool calls",
    source=DEEPSEEK_V3_SOURCE,
    end_of_turn=(EOS,),
    tool_calls=ToolCallFormat(
        pattern=r"<｜tool▁call▁begin｜>function<｜tool▁sep｜>(?P<name>[^\n]+)\n```json\n(?P<arguments>.*?)\n```<｜tool▁call▁end｜>"
    ),
)
DEEPSEEK_V31_TEMPLATE = ChatTemplate(
    name="deepseek_v3.1",
    description="DeepSeek-V3.1 hybrid thinking; thinking=true trains <think> reasoning, false the answers alone",
    source=DEEPSEEK_V31_SOURCE,
    end_of_turn=(EOS,),
    tool_calls=ToolCallFormat(
        pattern=r"<｜tool▁call▁begin｜>(?P<name>.*?)<｜tool▁sep｜>(?P<arguments>.*?)<｜tool▁call▁end｜>"
    ),
    options={"thinking": False},
)
DEEPSEEK_V2_TEMPLATE = ChatTemplate(
    name="deepseek_v2",
    description="DeepSeek-V2 chat: 'User: ...' and 'Assistant: ...' ended by <｜end▁of▁sentence｜>; no tools",
    source=DEEPSEEK_V2_SOURCE,
    end_of_turn=(EOS,),
)

# --------------------------------------------------------------------------- families

#: MLA's projections (``q_proj`` in models without a query rank), the dense MLP's and the
#: shared experts' projections; the routed experts are fused parameters.
TARGETS = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LANGUAGE_MODEL = {
    "embeddings": ("model.embed_tokens",),
    "language_model": ("model.layers", "model.norm"),
    "lm_head": ("lm_head",),
}

#: Two layers (a dense one, then a MoE one with 4 routed experts and a shared one) and a
#: small latent attention: every part of the architecture in about 2 M parameters.
_TINY_MLA = {
    **TINY,
    "num_hidden_layers": 2,
    "num_key_value_heads": TINY["num_attention_heads"],
    "first_k_dense_replace": 1,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
}

DEEPSEEK_V3 = ModelFamily(
    name="deepseek_v3",
    description="DeepSeek-V3, V3-0324, V3.1 and R1 (MLA, routed + shared experts)",
    model_types=("deepseek_v3",),
    aliases=("deepseek-v3", "deepseek-r1"),
    template="deepseek_v3",
    lora_targets=TARGETS,
    lora_target_parameters=EXPERT_PARAMETERS,
    module_groups=LANGUAGE_MODEL,
    presets={
        "tiny": {"model_type": "deepseek_v3", **_TINY_MLA, "q_lora_rank": 64, "n_group": 1, "topk_group": 1},
        "deepseek-v3": {
            "model_type": "deepseek_v3",
            "vocab_size": 129280,
            "hidden_size": 7168,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 61,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
            "n_shared_experts": 1,
            "n_routed_experts": 256,
            "num_experts_per_tok": 8,
            "routed_scaling_factor": 2.5,
            "n_group": 8,
            "topk_group": 4,
            "norm_topk_prob": True,
            "first_k_dense_replace": 3,
            "kv_lora_rank": 512,
            "q_lora_rank": 1536,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "max_position_embeddings": 163840,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "tokenizer_vocab": 8000,
        },
    },
    tokenizer=DEEPSEEK_V3_TOKENIZER,
)

DEEPSEEK_V2 = ModelFamily(
    name="deepseek_v2",
    description="DeepSeek-V2, V2-Lite and V2.5 (MLA, routed + shared experts)",
    model_types=("deepseek_v2",),
    aliases=("deepseek-v2",),
    template="deepseek_v2",
    lora_targets=TARGETS,
    lora_target_parameters=EXPERT_PARAMETERS,
    module_groups=LANGUAGE_MODEL,
    presets={
        # no query rank, as V2-Lite: queries through one q_proj
        "tiny": {"model_type": "deepseek_v2", **_TINY_MLA, "q_lora_rank": None},
        "deepseek-v2-lite": {
            "model_type": "deepseek_v2",
            "vocab_size": 102400,
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "n_shared_experts": 2,
            "n_routed_experts": 64,
            "num_experts_per_tok": 6,
            "routed_scaling_factor": 1.0,
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": False,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 512,
            "q_lora_rank": None,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "max_position_embeddings": 163840,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "tokenizer_vocab": 8000,
        },
    },
    tokenizer=DEEPSEEK_V2_TOKENIZER,
)


@hookimpl
def register_templates(register):
    for template in (DEEPSEEK_V3_TEMPLATE, DEEPSEEK_V31_TEMPLATE, DEEPSEEK_V2_TEMPLATE):
        register(template)


@hookimpl
def register_models(register):
    register(DEEPSEEK_V3)
    register(DEEPSEEK_V2)
