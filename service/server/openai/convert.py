"""OpenAI bodies <-> domain objects: requests to chat turns and generations, events to responses.

Every refusal names the field and what is allowed, as a `RequestError` (400 through the one
error table). What this server cannot honour is refused, never ignored: `n` other than 1,
`logit_bias`, a `response_format` other than text, `tool_choice` that forces a call, `best_of`,
`suffix`, stored completions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from service.chat.formats import Reasoning, ToolSpec
from service.chat.turns import ChatDelta, ChatTurn, ChatUsage, new_call_id
from service.runtime.interface import (
    FinishReason,
    GenerationRequest,
    RequestError,
    TokenEvent,
    TokenLogprob,
)
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.tokenizer import ChatMessage, TextTokenizer
from service.server.openai import protocol as api

# Our finish reasons -> OpenAI's (vLLM's word for an aborted request).
FINISH_REASONS = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.TOOL_CALLS: "tool_calls",
    FinishReason.ABORTED: "abort",
    FinishReason.DEADLINE: "length",
}
ROLES = {"developer": "system"}  # OpenAI's newer name for system instructions
EXTRAS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids")
# OpenAI chat fields refused unless null, and what to use instead.
UNSERVED_CHAT_FIELDS = {
    "reasoning_effort": "this model's reasoning is on or off: chat_template_kwargs."
    "enable_thinking, or the system prompt switch",
    "verbosity": "ask in the prompt",
    "functions": "use tools",
    "function_call": "use tool_choice",
    "prediction": "no predicted outputs",
    "audio": "text only",
}
# The engine's refusals name its fields; OpenAI's clients know these by other names.
ENGINE_FIELDS = {"max_new_tokens": "max_tokens", "stop strings": "stop", "stop string": "stop"}
OPENAI_PARAMS = {
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "stop",
    "prompt",
}


def engine_refusal(message: str) -> tuple[str, str | None]:
    """An engine refusal in the request's own words, and the field it names (OpenAI's `param`)."""
    for engine_name, name in ENGINE_FIELDS.items():
        message = message.replace(engine_name, name)
    first = message.split(" ", 1)[0]
    return message, first if first in OPENAI_PARAMS else None


def _refuse_unsupported(request: api.SamplingFields) -> None:
    if request.n not in (None, 1):
        raise RequestError(f"n: {request.n} is not supported; allowed: 1")
    if request.logit_bias:
        raise RequestError("logit_bias is not supported; allowed: empty or absent")
    if request.stream_options is not None and not request.stream:
        raise RequestError("stream_options is only allowed with stream: true")


def _extras(request: api.SamplingFields) -> dict[str, Any]:
    """vLLM's top-level extras and NIM's nvext; the same field set twice must agree."""
    found = {name: getattr(request, name) for name in EXTRAS if getattr(request, name) is not None}
    if request.nvext is not None:
        for name in EXTRAS:
            value = getattr(request.nvext, name)
            if value is None:
                continue
            if name in found and found[name] != value:
                raise RequestError(f"{name} and nvext.{name} differ; set one of them")
            found[name] = value
    return found


def request_options(
    request: api.SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    deadline: float | None = None,
) -> RequestOptions:
    """The engine options of an OpenAI request (unset fields take the model's defaults)."""
    _refuse_unsupported(request)
    extras = _extras(request)
    given = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        **{k: v for k, v in extras.items() if k in SamplingParams.option_names()},
    }
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return RequestOptions.asked(
        {k: v for k, v in given.items() if v is not None},
        max_new_tokens=max_tokens,
        stop_strings=tuple(stops),
        stop_token_ids=tuple(extras.get("stop_token_ids", ())),
        ignore_eos=bool(extras.get("ignore_eos", False)),
        logprobs=logprobs,
        deadline=deadline,
    )


def _chat_max_tokens(request: api.ChatCompletionRequest) -> int | None:
    new, old = request.max_completion_tokens, request.max_tokens
    if new is not None and old is not None and new != old:
        raise RequestError("max_completion_tokens and max_tokens differ; set one of them")
    return new if new is not None else old


def _chat_logprobs(request: api.ChatCompletionRequest) -> int | None:
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs: true")
    return (request.top_logprobs or 0) if request.logprobs else None


def _refuse_chat_unsupported(request: api.ChatCompletionRequest) -> None:
    if request.response_format is not None and request.response_format.type != "text":
        raise RequestError(
            f"response_format: {request.response_format.type!r} is not supported; allowed: 'text'"
        )
    if request.tool_choice == "required" or isinstance(request.tool_choice, api.ToolChoiceFunction):
        raise RequestError(
            "tool_choice: forcing a tool call is not supported; allowed: 'auto', 'none'"
        )
    if request.store:
        raise RequestError("store: true is not supported (completions are not stored)")
    if request.modalities not in (None, ["text"]):
        raise RequestError(f"modalities: {request.modalities} is not supported; allowed: ['text']")
    for name, instead in UNSERVED_CHAT_FIELDS.items():
        if getattr(request, name) is not None:
            raise RequestError(f"{name} is not supported; allowed: null or absent ({instead})")


def message(index: int, sent: api.ChatMessage) -> ChatMessage:
    """The domain message of `messages[index]`; tool turns and calls checked."""
    if sent.role == "tool" and not sent.tool_call_id:
        raise RequestError(f"messages[{index}]: a tool message needs tool_call_id")
    if sent.tool_calls and sent.role != "assistant":
        raise RequestError(f"messages[{index}]: only assistant messages carry tool_calls")
    calls = tuple(
        {"id": c.id, "name": c.function.name, "arguments": _arguments(index, c.function.arguments)}
        for c in sent.tool_calls or ()
    )
    return ChatMessage(
        ROLES.get(sent.role, sent.role),
        sent.text(),
        tool_calls=calls,
        tool_call_id=sent.tool_call_id,
    )


def _arguments(index: int, text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise RequestError(
            f"messages[{index}].tool_calls: function.arguments is not JSON ({err.msg})"
        ) from None


def chat_turn(
    request: api.ChatCompletionRequest, request_id: str, deadline: float | None = None
) -> ChatTurn:
    """The chat turn of a chat completion request."""
    _refuse_chat_unsupported(request)
    options = request_options(request, _chat_max_tokens(request), _chat_logprobs(request), deadline)
    tools = ()
    if request.tool_choice != "none":
        tools = tuple(
            ToolSpec(t.function.name, t.function.description, t.function.parameters)
            for t in request.tools or ()
        )
    budget = request.nvext.max_thinking_tokens if request.nvext is not None else None
    return ChatTurn(
        request_id=request_id,
        messages=tuple(message(i, m) for i, m in enumerate(request.messages)),
        reasoning=_reasoning(request),
        reasoning_budget_tokens=budget,
        tools=tools,
        options=options,
    )


def _reasoning(request: api.ChatCompletionRequest) -> Reasoning:
    """The typed switch (`chat_template_kwargs.enable_thinking`); else the model's default
    or what the system prompt says."""
    kwargs = request.chat_template_kwargs
    if kwargs is None or kwargs.enable_thinking is None:
        return Reasoning.DEFAULT
    return Reasoning.ON if kwargs.enable_thinking else Reasoning.OFF


def prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completion request: one text or token list, or a list of them."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def generation_requests(
    request: api.CompletionRequest,
    request_id: str,
    tokenizer: TextTokenizer,
    deadline: float | None = None,
    max_prompts: int = 256,
) -> list[GenerationRequest]:
    """One engine request per prompt of a completion request (at most `max_prompts`)."""
    if request.best_of not in (None, 1):
        raise RequestError(f"best_of: {request.best_of} is not supported; allowed: 1")
    if request.suffix:
        raise RequestError("suffix is not supported (no fill-in-the-middle)")
    options = request_options(request, request.max_tokens, request.logprobs, deadline)
    found = prompts(request.prompt)
    if len(found) > max_prompts:
        raise RequestError(f"prompt: {len(found)} prompts; allowed: at most {max_prompts}")
    if request.echo and request.logprobs is not None:  # the prompt's own, as lm-eval asks
        options = replace(options, prompt_logprobs=request.logprobs)
    return [
        GenerationRequest(
            request_id if len(found) == 1 else f"{request_id}-{index}",
            tuple(tokenizer.encode(p)) if isinstance(p, str) else tuple(p),
            options,
        )
        for index, p in enumerate(found)
    ]


# --- responses ------------------------------------------------------------------------------


def usage(prompt: int, completion: int, reasoning: int = 0, cached: int = 0) -> api.Usage:
    """OpenAI's usage object."""
    return api.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        completion_tokens_details={"reasoning_tokens": reasoning},
        prompt_tokens_details={"cached_tokens": cached},
    )


def chat_usage(u: ChatUsage) -> api.Usage:
    """The usage of a finished chat turn."""
    return usage(u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.cached_prompt_tokens)


def tool_calls(calls: Sequence[dict[str, Any]], stream: bool = False) -> list[dict[str, Any]]:
    """The model's calls as OpenAI `tool_calls` (JSON-string arguments, call ids)."""
    out = []
    for index, call in enumerate(calls):
        entry: dict[str, Any] = {
            "id": call.get("id") or new_call_id(),
            "type": "function",
            "function": {
                "name": call.get("name", ""),
                "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
            },
        }
        out.append({"index": index, **entry} if stream else entry)
    return out


def chat_logprobs(
    logprobs: Sequence[TokenLogprob], tokenizer: TextTokenizer
) -> api.ChatLogprobs | None:
    """OpenAI's chat logprobs: each token's text, bytes, log-probability and alternatives."""
    if not logprobs:
        return None

    def entry(token: int, value: float) -> dict[str, Any]:
        text = tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return api.ChatLogprobs(
        content=[
            api.ChatTokenLogprob(
                **entry(lp.token_id, lp.logprob),
                top_logprobs=[api.TopLogprob(**entry(t, v)) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )


def assistant_message(delta: ChatDelta, calls: list[dict[str, Any]] | None) -> api.AssistantMessage:
    """The assistant's message (or a delta of it): answer, reasoning under both names, calls."""
    reasoning = delta.reasoning or None
    return api.AssistantMessage(
        role="assistant",
        content=delta.content if delta.content or not calls else None,
        reasoning_content=reasoning,
        reasoning=reasoning,
        tool_calls=calls or None,
    )


def chat_completion(
    response_id: str,
    model: str,
    deltas: Sequence[ChatDelta],
    tokenizer: TextTokenizer,
) -> api.ChatCompletion:
    """A whole chat completion from all the deltas of a turn."""
    last = deltas[-1]
    whole = ChatDelta(
        reasoning="".join(d.reasoning for d in deltas),
        content="".join(d.content for d in deltas),
    )
    calls = tool_calls(last.tool_calls) if last.tool_calls else None
    logprobs = tuple(lp for d in deltas for lp in d.logprobs)
    choice = api.ChatChoice(
        index=0,
        message=assistant_message(whole, calls),
        logprobs=chat_logprobs(logprobs, tokenizer),
        finish_reason=finish_reason(last.finish_reason),
    )
    return api.ChatCompletion(
        id=response_id,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=chat_usage(last.usage) if last.usage else None,
        sampling_defaults_applied=applied(last.sampling_applied),
    )


def applied(values: Mapping[str, float | int]) -> dict[str, float | int] | None:
    """The sampling defaults a request ran with, as the response reports them (None: none)."""
    return dict(values) or None


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish reason."""
    return FINISH_REASONS.get(reason) if reason is not None else None


def completion_choice(
    index: int,
    events: Sequence[TokenEvent],
    tokenizer: TextTokenizer,
    echo: str = "",
    scored_prompt: Sequence[int] | None = None,
) -> api.CompletionChoice:
    """One choice of a completion from the events of its generation; with `scored_prompt`
    (echo with logprobs) the logprobs cover those prompt tokens first."""
    logprobs = tuple(lp for e in events for lp in event_logprobs(e))
    generated = completion_logprobs(logprobs, tokenizer, len(echo)) if logprobs else None
    if scored_prompt is not None:
        scored = [lp for e in events for lp in e.prompt_logprobs]
        prompt_part = echo_logprobs(scored_prompt, scored, tokenizer)
        generated = join_logprobs(prompt_part, generated) if generated else prompt_part
    return api.CompletionChoice(
        index=index,
        text=echo + "".join(e.text for e in events),
        logprobs=generated,
        finish_reason=finish_reason(events[-1].finish_reason),
    )


def event_logprobs(event: TokenEvent) -> tuple[TokenLogprob, ...]:
    """A completion event's token log-probabilities; the stop token that ended the completion
    is listed last, as OpenAI's (and vLLM's) list it."""
    stop = (event.stop_logprob,) if event.stop_logprob is not None else ()
    return (*event.logprobs, *stop)


def echo_logprobs(
    prompt_ids: Sequence[int], scored: Sequence[TokenLogprob], tokenizer: TextTokenizer
) -> api.CompletionLogprobs:
    """The echoed prompt's logprobs: its first token has none (`null`, as OpenAI's)."""
    first = tokenizer.decode(list(prompt_ids[:1]), skip_special_tokens=False)
    head = api.CompletionLogprobs(
        tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0]
    )
    return join_logprobs(head, completion_logprobs(scored, tokenizer, len(first)))


def join_logprobs(a: api.CompletionLogprobs, b: api.CompletionLogprobs) -> api.CompletionLogprobs:
    """Two consecutive stretches of completion logprobs as one."""
    return api.CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], tokenizer: TextTokenizer, offset: int = 0
) -> api.CompletionLogprobs:
    """The legacy completions logprobs: tokens, their log-probabilities, alternatives, offsets."""
    tokens = [tokenizer.decode([lp.token_id], skip_special_tokens=False) for lp in logprobs]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return api.CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[
            {tokenizer.decode([t], skip_special_tokens=False): v for t, v in lp.top} or None
            for lp in logprobs
        ],
        text_offset=offsets,
    )
