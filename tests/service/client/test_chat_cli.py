"""`nemotron-chat` end to end: the real executable against a real server, and against a
scripted in-process server for what the embedded model cannot produce (reasoning, tool calls)
and what the server does not check yet (API keys, mutual TLS)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import struct_pb2
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from tests.service.certs import make_certificates, needs_openssl
from tests.service.server_process import WAIT_S, free_port, wait_until

CHAT = shutil.which("nemotron-chat") or f"{sys.prefix}/bin/nemotron-chat"
FRANCE = "What is the capital of France?"
API_KEY = "sk-test-4f1d2c9a7b"
# Clean environment: no address or key inherited from the developer's shell, no colours.
BASE_ENV = {
    k: v for k, v in os.environ.items() if k not in ("NEMOTRON_ADDRESS", "NEMOTRON_API_KEY")
}
BASE_ENV["NO_COLOR"] = "1"


def chat(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run `nemotron-chat` with prompts piped on stdin (a script, not a terminal)."""
    return subprocess.run(
        [CHAT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**BASE_ENV, **(env or {})},
    )


# The real server, the embedded SmolLM2 model (family "generic": no reasoning switch).


@pytest.mark.slow
def test_one_shot_prints_the_answer_on_stdout_and_usage_on_stderr(server):
    done = chat("--address", server.address, "--prompt", FRANCE, "--max-tokens", "32", "--usage")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert done.stdout.count("\n") == 1  # only the answer: nothing else on stdout
    usage = done.stderr
    for part in ("prompt", "completion", "reasoning", "queue", "ttft", "total", "finish stop"):
        assert part in usage, usage


@pytest.mark.slow
def test_json_is_the_final_chat_response_with_the_answer(server):
    done = chat("--address", server.address, "--prompt", FRANCE, "--max-tokens", "32", "--json")
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)
    assert "Paris" in response["content"]
    assert response["finish_reason"] == "FINISH_REASON_STOP"
    assert response["usage"]["completion_tokens"] > 0 and response["request_id"]
    assert response["timings"]["total_ms"] >= response["timings"]["time_to_first_token_ms"] > 0


@pytest.mark.slow
def test_piped_lines_are_turns_of_one_conversation(server):
    lines = f"{FRANCE}\n\nAnd what about Italy?\n"
    done = chat("--address", server.address, "--max-tokens", "24", "--json", stdin=lines)
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert "Paris" in first["content"]
    assert second["content"].strip()
    # The second request carried the first turn, question and answer.
    grown = second["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"]
    assert grown > first["usage"]["completion_tokens"]


@pytest.mark.slow
def test_reasoning_on_is_refused_cleanly_for_a_family_without_a_switch(server):
    done = chat("--address", server.address, "--prompt", FRANCE, "--reasoning", "on")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("nemotron-chat: error: INVALID_ARGUMENT: ")
    assert "no reasoning switch" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_server_error_exits_2_with_the_status_code_and_details(server):
    done = chat("--address", server.address, "--prompt", FRANCE, "--top-p", "7")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "nemotron-chat: error: INVALID_ARGUMENT: top_p 7.0 is outside (0.0, 1.0]"
    )


_DEFAULT_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """`nemotron-chat` on a pseudo-terminal, so it runs its interactive chat."""

    def __init__(self, *args: str) -> None:
        self.master, replica = pty.openpty()
        self.process = subprocess.Popen(
            # A shell gives a foreground command Ctrl-C back even where the tests themselves
            # run as a background job, which inherits SIGINT ignored (and Python then installs
            # no KeyboardInterrupt handler): do the same, so the test does not depend on it.
            # A default disposition survives exec; no preexec_fn (unsafe beside gRPC threads).
            [sys.executable, "-c", _DEFAULT_SIGINT_THEN_EXEC, CHAT, *args],
            stdin=replica,
            stdout=replica,
            stderr=replica,
            env=BASE_ENV,
        )
        os.close(replica)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> None:
        self.wait_for(lambda seen: text in seen, repr(text), timeout)

    def wait_for(self, shown: Callable[[str], bool], what: str, timeout: float = 60) -> None:
        """Read what the process writes until `shown(all of it)` holds; fail naming `what`."""
        deadline = time.monotonic() + timeout
        while not shown(self.seen) and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process exited
                    break
        assert shown(self.seen), f"the terminal did not show {what}:\n{self.seen}"

    def type(self, line: str) -> None:
        os.write(self.master, f"{line}\n".encode())

    def close(self, timeout: float = 30) -> int:
        """Wait for the process to leave, reading what it writes, then close the terminal."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        if self.process.poll() is None:
            self.process.kill()
        os.close(self.master)
        return self.process.wait(timeout=timeout)


def _cancelled_chat_stream(line: dict) -> bool:
    """Whether a server log line ends a ChatStream that its caller cancelled."""
    fields = (line["event"], line.get("method"), line.get("code"))
    return fields == ("rpc_finished", "ChatStream", "CANCELLED")


def _reply_started(question: str) -> Callable[[str], bool]:
    """Whether the terminal shows words after the echoed question (escape sequences aside)."""

    def started(seen: str) -> bool:
        after = seen.partition(question)[2]
        return re.search(r"\w", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", after)) is not None

    return started


@pytest.mark.slow
def test_ctrl_c_cancels_the_reply_on_the_server_and_the_session_goes_on(server):
    cancelled_before = len([line for line in server.log_lines() if _cancelled_chat_stream(line)])
    terminal = Terminal("--address", server.address, "--max-tokens", "400")
    try:
        terminal.expect("/help lists commands")
        terminal.expect("> ")
        question = "Write a very long story about a dragon who learns to cook."
        terminal.type(question)
        terminal.wait_for(_reply_started(question), "the reply being written", timeout=WAIT_S)
        terminal.process.send_signal(signal.SIGINT)
        terminal.expect("[reply cancelled]", timeout=WAIT_S)
        server.wait_for_log(  # the server saw the call cancelled, not finished
            _cancelled_chat_stream, "a cancelled ChatStream", count=cancelled_before + 1
        )

        def idle() -> pb.GetEngineStatsResponse | None:
            stats = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=5)
            return stats if (stats.running_requests, stats.waiting_requests) == (0, 0) else None

        stats = wait_until(idle, "the engine to drop the cancelled request")
        assert (stats.running_requests, stats.waiting_requests) == (0, 0)
        terminal.seen = ""
        terminal.type(FRANCE)
        terminal.expect("Paris")
        terminal.type("/exit")
    finally:
        code = terminal.close()
    assert code == 0, terminal.seen


@pytest.mark.slow
def test_interactive_error_drops_the_turn_and_commands_recover(server):
    terminal = Terminal("--address", server.address, "--max-tokens", "24")
    try:
        terminal.expect("> ")
        terminal.type("/reasoning on")
        terminal.expect("reasoning: on")
        terminal.type(FRANCE)
        terminal.expect("nemotron-chat: error: INVALID_ARGUMENT: ")
        terminal.type("/reasoning default")
        terminal.expect("reasoning: default")
        terminal.type(FRANCE)
        terminal.expect("Paris")
        terminal.type("/nonsense")
        terminal.expect("unknown command /nonsense; /help lists them")
        terminal.type("/exit")
    finally:
        code = terminal.close()
    assert code == 0, terminal.seen


# Failures before any answer: no model needed.


def test_unreachable_address_exits_2_quickly_naming_the_address():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = chat("--address", address, "--prompt", FRANCE, "--timeout", "5", timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("nemotron-chat: error: UNAVAILABLE: ")
    assert address in done.stderr
    assert time.monotonic() - started < 10


def test_address_comes_from_the_environment():
    address = f"127.0.0.1:{free_port()}"
    done = chat("--prompt", FRANCE, "--timeout", "5", env={"NEMOTRON_ADDRESS": address})
    assert done.returncode == 2 and address in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reasoning", "maybe"], "invalid choice: 'maybe' (choose from 'default', 'on', 'off')"),
        (["--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
        (["--timeout", "0"], "argument --timeout: must be > 0"),
        (["--api-key-file", "/nonexistent/key"], "--api-key-file: cannot read /nonexistent/key"),
    ],
)
def test_bad_flags_exit_2_with_argparse_usage_and_what_is_allowed(args, message):
    done = chat(*args, "--prompt", FRANCE, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: nemotron-chat")
    assert message in done.stderr


# A scripted server: streams reasoning, an answer and a tool call, and records each call.

SCRIPT = (
    pb.ChatStreamResponse(request_id="req-1", reasoning="The user asks about "),
    pb.ChatStreamResponse(request_id="req-1", reasoning="France."),
    pb.ChatStreamResponse(request_id="req-1", content="Paris"),
    pb.ChatStreamResponse(request_id="req-1", content=" it is."),
)


def _final() -> pb.ChatStreamResponse:
    arguments = struct_pb2.Struct()
    arguments.update({"city": "Paris", "days": 3})
    return pb.ChatStreamResponse(
        request_id="req-1",
        tool_calls=[pb.ToolCall(id="call_1", name="forecast", arguments=arguments)],
        finish_reason=pb.FINISH_REASON_TOOL_CALLS,
        usage=pb.Usage(prompt_tokens=11, completion_tokens=9, reasoning_tokens=4),
        timings=pb.Timings(queue_ms=1.5, time_to_first_token_ms=20.0, total_ms=90.0),
    )


@dataclass
class ScriptedServicer(pb_grpc.GenerationServiceServicer):
    """Answers every ChatStream with SCRIPT and remembers the requests and their metadata."""

    requests: list[pb.ChatStreamRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)

    def ChatStream(self, request, context) -> Iterator[pb.ChatStreamResponse]:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        yield from SCRIPT
        yield _final()


@dataclass
class ScriptedServer:
    address: str
    servicer: ScriptedServicer
    server: grpc.Server


def _start_scripted(credentials: grpc.ServerCredentials | None = None) -> ScriptedServer:
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = free_port()
    if credentials is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    return ScriptedServer(f"127.0.0.1:{port}", servicer, server)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    running = _start_scripted()
    yield running
    running.server.stop(grace=None)


def test_reasoning_is_hidden_from_scripts_and_the_answer_alone_is_on_stdout(scripted):
    done = chat("--address", scripted.address, "--prompt", FRANCE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'Paris it is.\n[tool call] forecast {"city": "Paris", "days": 3}\n'
    assert "France." not in done.stderr


def test_show_reasoning_writes_it_apart_on_stderr(scripted):
    done = chat("--address", scripted.address, "--prompt", FRANCE, "--show-reasoning")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "[reasoning]\nThe user asks about France.\n[/reasoning]\n"
    assert done.stdout.startswith("Paris it is.\n")


def test_json_carries_reasoning_and_tool_calls_and_usage_counts_reasoning(scripted):
    done = chat("--address", scripted.address, "--prompt", FRANCE, "--json", "--usage")
    response = json.loads(done.stdout)
    assert response["reasoning"] == "The user asks about France."
    assert response["content"] == "Paris it is."
    assert response["tool_calls"] == [  # with the id a tool message answers
        {"id": "call_1", "name": "forecast", "arguments": {"city": "Paris", "days": 3}}
    ]
    assert response["finish_reason"] == "FINISH_REASON_TOOL_CALLS"
    assert "completion 9 tokens (4 reasoning)" in done.stderr
    assert "queue 1.5 ms, ttft 20.0 ms, total 90.0 ms" in done.stderr


def test_flags_become_the_request_and_history_is_sent_each_turn(scripted, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(
        json.dumps(
            [
                {
                    "type": "function",
                    "function": {
                        "name": "forecast",
                        "description": "weather",
                        "parameters": {"type": "object", "properties": {"city": {}}},
                    },
                }
            ]
        )
    )
    flags = ["--system", "Be brief.", "--reasoning", "off", "--reasoning-budget", "64"]
    flags += ["--temperature", "0.5", "--top-p", "0.9", "--seed", "7", "--max-tokens", "40"]
    flags += ["--tools", str(tools)]
    stdin = "first\n/reasoning on\nsecond\n/reset\nthird\n"
    done = chat("--address", scripted.address, *flags, stdin=stdin)
    assert done.returncode == 0, done.stderr
    first, second, third = scripted.servicer.requests
    assert first.reasoning == pb.REASONING_MODE_OFF and second.reasoning == pb.REASONING_MODE_ON
    assert first.reasoning_budget_tokens == 64 and first.limits.max_new_tokens == 40
    assert first.sampling.temperature == pytest.approx(0.5) and first.sampling.seed == 7
    assert first.sampling.top_p == pytest.approx(0.9)
    assert [t.name for t in first.tools] == ["forecast"]
    roles = [(m.role, m.content) for m in second.messages]
    assert roles == [
        (pb.ROLE_SYSTEM, "Be brief."),
        (pb.ROLE_USER, "first"),
        (pb.ROLE_ASSISTANT, "Paris it is."),
        (pb.ROLE_USER, "second"),
    ]
    assert [m.content for m in third.messages] == ["Be brief.", "third"]


def test_unset_flags_leave_the_server_defaults(scripted):
    chat("--address", scripted.address, "--prompt", FRANCE)
    (request,) = scripted.servicer.requests
    assert request.reasoning == pb.REASONING_MODE_UNSPECIFIED
    assert not request.HasField("reasoning_budget_tokens")
    assert not request.sampling.HasField("temperature") and not request.sampling.HasField("top_p")
    assert not request.limits.HasField("max_new_tokens")
    assert "authorization" not in scripted.servicer.metadata[0]


@pytest.mark.parametrize("source", ["file", "env"])
def test_api_key_is_sent_as_a_bearer_token_and_never_printed(scripted, tmp_path, source):
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    args = ["--api-key-file", str(key_file)] if source == "file" else []
    env = {"NEMOTRON_API_KEY": API_KEY} if source == "env" else {}
    done = chat(
        "--address", scripted.address, "--prompt", FRANCE, "--usage", "--json", *args, env=env
    )
    assert done.returncode == 0, done.stderr
    assert scripted.servicer.metadata[0]["authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in done.stdout + done.stderr


@needs_openssl
def test_mutual_tls_with_a_private_ca_and_a_server_name_override(tmp_path):
    files = make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(files["server.key"], files["server.pem"])],
        root_certificates=files["ca.pem"],
        require_client_auth=True,
    )
    running = _start_scripted(credentials)
    try:
        tls = ["--tls-ca", str(tmp_path / "ca.pem"), "--tls-server-name", "nemotron.test"]
        client = [
            "--tls-cert",
            str(tmp_path / "client.pem"),
            "--tls-key",
            str(tmp_path / "client.key"),
        ]
        done = chat("--address", running.address, "--prompt", FRANCE, *tls, *client, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Paris it is.")
        refused = chat(
            "--address", running.address, "--prompt", FRANCE, "--timeout", "30", *tls, timeout=60
        )
        assert refused.returncode == 2 and "UNAVAILABLE" in refused.stderr
        assert running.address in refused.stderr
        assert len(running.servicer.requests) == 1
    finally:
        running.server.stop(grace=None)


def test_usage_names_the_models_sampling_defaults_the_turn_ran_with():
    from service.client.chat_client import usage_line

    response = pb.ChatResponse(finish_reason=pb.FINISH_REASON_STOP)
    assert "sampling defaults" not in usage_line(response)
    response.sampling_defaults_applied.CopyFrom(pb.SamplingParams(temperature=0.6, top_p=0.95))
    line = usage_line(response)
    assert line.endswith("| [model's sampling defaults] temperature 0.6, top_p 0.95"), line
    response.sampling_defaults_applied.seed = 7  # a uint64: JSON writes it as a string
    assert usage_line(response).endswith("seed 7, temperature 0.6, top_p 0.95")
