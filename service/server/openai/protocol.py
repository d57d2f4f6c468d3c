"""Request and response bodies of the OpenAI API, as pydantic models (the subset we serve).

Requests are strict: a field OpenAI does not define is refused (as OpenAI refuses it), and so
is a field it defines that this server cannot honour (`n` > 1, `response_format` other than
text, `logit_bias`, ...), each with a message saying what is allowed. NIM's `nvext` and the
extras vLLM accepts at the top level (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`) are accepted too. Responses are plain models serialized without `None`s
where OpenAI leaves a field out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    """A request part: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionCall(Strict):
    """A call the assistant made, as OpenAI writes it: arguments are a JSON string."""

    name: str
    arguments: str


class ToolCall(Strict):
    """One entry of an assistant message's `tool_calls`."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: StrictInt | None = None  # present when the call was rebuilt from a stream


class TextPart(Strict):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    """One turn; `content` may be a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns
    # An earlier assistant turn's thinking, under NIM's and vLLM's names: accepted so that a
    # returned message can be sent back as it is, and left out of the prompt (as the chat
    # templates of reasoning models do with past thinking).
    reasoning_content: str | None = None
    reasoning: str | None = None
    # What the SDK writes back for a returned message (`message.model_dump()`): nulls, or
    # annotations of the answer, which do not reach the prompt.
    refusal: None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionSpec(Strict):
    """A function the model may call."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    strict: bool | None = None


class Tool(Strict):
    """An entry of `tools`."""

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Strict):
    """The function `tool_choice` names."""

    name: str


class ToolChoiceFunction(Strict):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    """What a streamed response carries besides the deltas."""

    include_usage: StrictBool = False


class ResponseFormat(Strict):
    """The output format; only plain text is served."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class NvExt(Strict):
    """NIM's request extensions."""

    max_thinking_tokens: StrictInt | None = None
    top_k: StrictInt | None = None
    min_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None


class ChatTemplateKwargs(Strict):
    """vLLM's `chat_template_kwargs`; the reasoning switch is the one variable served."""

    enable_thinking: StrictBool | None = None


class SamplingFields(Strict):
    """Fields chat and completions share: sampling, limits, stops, streaming, extras."""

    model: str
    max_tokens: StrictInt | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    n: StrictInt | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    stream: StrictBool | None = None  # null: false, as OpenAI takes it
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras, at the top level.
    top_k: StrictInt | None = None
    min_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None
    nvext: NvExt | None = None


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    # OpenAI fields this server takes only as null (refused otherwise, with the reason), and
    # hints that do not change the answer (accepted).
    reasoning_effort: str | None = None
    verbosity: str | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None


class TokenizeRequest(Strict):
    """`POST /tokenize`: a text, or a conversation rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False  # prompts are encoded as they are (templates add BOS)


class DetokenizeRequest(Strict):
    """`POST /detokenize`."""

    model: str | None = None
    tokens: list[StrictInt]


# --- responses ------------------------------------------------------------------------------


class Loose(BaseModel):
    """A response part."""

    model_config = ConfigDict(extra="allow")


class Usage(Loose):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: dict[str, int] | None = None
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprob(Loose):
    """One alternative of a chat token."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(Loose):
    """A chat token's log-probability and its alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(Loose):
    """`choices[].logprobs` of a chat completion."""

    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(Loose):
    """The assistant's turn (or a stream delta of it)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # what NIM and vLLM clients read
    reasoning: str | None = None  # vLLM's newer name for the same text
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(Loose):
    """One choice of a chat completion or chunk."""

    index: int = 0
    message: AssistantMessage | None = None
    delta: AssistantMessage | None = None
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(Loose):
    """A chat completion or one chunk of a streamed one."""

    id: str
    object: Literal["chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    # The model's sampling defaults the request ran with, for the fields it left unset (on a
    # stream's chunk with the finish reason); absent when none applied.
    sampling_defaults_applied: dict[str, float | int] | None = None


class CompletionLogprobs(Loose):
    """`choices[].logprobs` of a (legacy) completion."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(Loose):
    """One choice of a completion or chunk."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Loose):
    """A completion or one chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    # The model's sampling defaults the request ran with, for the fields it left unset (on a
    # stream's chunk with the finish reason); absent when none applied.
    sampling_defaults_applied: dict[str, float | int] | None = None
