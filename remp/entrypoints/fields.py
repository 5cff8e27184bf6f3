"""Request fields remp knows and refuses: the OpenAI and vLLM fields it does not implement, each with the reason
a client is told. Every field a request model declares is honoured; any other field, known here or not, is a
400 that names it (the README's field table lists both kinds, and a test walks it)."""

from __future__ import annotations

REFUSED: dict[str, str] = {
    # OpenAI
    "audio": "remp serves text models (no audio output)",
    "modalities": "remp serves text models: text is the only output modality",
    "prediction": "predicted outputs are not implemented",
    "reasoning_effort": "the served models have no reasoning-effort control",
    "verbosity": "the served models have no verbosity control",
    "web_search_options": "remp has no web search",
    "functions": "deprecated by OpenAI: use `tools`",
    "function_call": "deprecated by OpenAI: use `tool_choice`",
    "store": "remp does not store completions",
    "metadata": "remp does not store completions (metadata is for stored ones)",
    "service_tier": "remp has one service tier",
    "prompt_cache_key": "remp caches prefixes by content; it takes no cache key (see `cache_salt`)",
    "safety_identifier": "remp has no safety system to report to",
    "suffix": "fill-in-the-middle is not implemented (the served models have no FIM format)",
    # vLLM
    "use_beam_search": "beam search is not implemented",
    "length_penalty": "applies to beam search, which is not implemented",
    "bad_words": "bad word lists are not implemented",
    "spaces_between_special_tokens": "not implemented: special tokens are decoded as the tokenizer spells them",
    "documents": "documents for RAG chat templates are not implemented",
    "mm_processor_kwargs": "remp serves text models",
    "structural_tag": "structural tags are not implemented: use `response_format`, `guided_*` or `tools`",
    "guided_decoding_backend": "remp has one structured-output backend",
    "guided_whitespace_pattern": "not implemented",
    "priority": "remp schedules first come, first served (no priorities)",
    "logits_processors": "custom logits processors are not implemented",
    "return_tokens_as_token_ids": "not implemented",
    "kv_transfer_params": "disaggregated prefill is not implemented",
    "vllm_xargs": "remp takes no vLLM extension arguments",
    "truncate_prompt_tokens": "not implemented: a prompt longer than the context is refused",
    "allowed_token_ids": "not implemented: use `logit_bias` or `guided_choice`",
}


def refusal(field: str) -> str:
    """The message for a field a request model does not declare."""
    reason = REFUSED.get(field)
    if reason is not None:
        return f"`{field}` is not supported by remp: {reason}"
    return f"unknown field `{field}`"
