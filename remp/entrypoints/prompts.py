"""Request prompts -> checked token ids, off the engine thread and off the event loop.

A cheap bound comes first: no token of the vocabulary spells more than `max_token_chars` characters, so a
text longer than max_model_len * max_token_chars cannot fit and is refused without tokenizing it. The
tokenizer runs on one thread of its own (HF tokenizers are not safe to call from several threads at once), so
a long prompt delays other prompts' tokenization, never the steps of running requests. The checks are the
engine's (empty, too long, out of vocabulary) plus vLLM's server rule: prompt + max_tokens must fit.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

from remp.engine import LLMEngine
from remp.entrypoints.errors import APIError
from remp.entrypoints.tool_calls import hermes_messages
from remp.sampling_params import SamplingParams


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token decodes to (byte-level tokens spell bytes, >= chars)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(1, *(len(p) for p in pieces if p))


class PromptProcessor:
    def __init__(self, engine: LLMEngine, chat_template: str | None = None):
        self.engine, self.chat_template = engine, chat_template
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_chars = self.max_model_len * max_token_chars(self.tokenizer)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="remp-tokenizer")

    def _check_text(self, text: str, param: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            msg = f"{param} is not valid Unicode text: {e.reason} at character {e.start}"
            raise APIError(400, msg, param=param) from None
        if len(text) > self.max_chars:
            raise APIError(
                400,
                f"{param} has {len(text)} characters: more than the {self.max_model_len} tokens of this model's "
                f"context can hold (max_model_len={self.max_model_len})",
                param=param,
            )

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _check_ids(self, ids: list[int], params: SamplingParams, param: str) -> list[int]:
        try:
            self.engine.check_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} in the "
                "completion). Please reduce the length of the prompt or the completion (max_tokens).",
                param="max_tokens",
            )
        return ids

    async def prompt_ids(
        self,
        prompt: str | list[int],
        params: SamplingParams | None,
        param: str = "prompt",
        add_special_tokens: bool = True,
    ) -> list[int]:
        """A prompt's token ids, checked against the context (params None: only tokenized, for /tokenize)."""
        if isinstance(prompt, str):
            self._check_text(prompt, param)
            prompt = await self._run(lambda: self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return list(prompt) if params is None else self._check_ids(list(prompt), params, param)

    async def chat_ids(
        self,
        messages: list[dict],
        params: SamplingParams | None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        template_kwargs: dict | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """A chat rendered by its template (the request's, else --chat-template's, else the model's) and
        tokenized; params None: only rendered (/tokenize), not checked against the context."""
        for i, m in enumerate(messages):
            self._check_text(m["content"], f"messages.{i}.content")
        if sum(len(m["content"]) for m in messages) > self.max_chars:
            self._check_text("".join(m["content"] for m in messages), "messages")
        template = chat_template or self.chat_template

        def render() -> list[int]:
            own = template or self.tokenizer.chat_template or ""
            kwargs = dict(template_kwargs or {})
            if "tools" in own or "tool_calls" in own:  # the template writes tools and tool turns itself
                convo = [_with_argument_objects(m) for m in messages]
                if tools:
                    kwargs["tools"] = tools
            else:  # Hermes-style, in plain turns
                convo = hermes_messages(messages, tools)
            text = self.tokenizer.apply_chat_template(
                convo,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                chat_template=template,
                **kwargs,
            )
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

        try:
            ids = await self._run(render)
        except Exception as e:  # a template that refuses the conversation (e.g. roles out of order), bad kwargs
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return ids if params is None else self._check_ids(ids, params, "messages")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _with_argument_objects(message: dict) -> dict:
    """Tool calls as templates read them: the arguments a JSON object (OpenAI sends them as a JSON string)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for c in message["tool_calls"]:
        try:
            args = json.loads(c["function"]["arguments"])
        except json.JSONDecodeError:
            args = c["function"]["arguments"]
        calls.append({**c, "function": {**c["function"], "arguments": args}})
    return {**message, "tool_calls": calls}
