"""API keys and (mutual) TLS on a real server: the right status for each refusal, open health,
keys re-read when the Secret's file changes, and keys never in the logs."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nemotron.v1 import generation_pb2 as pb

from tests.service.certs import SERVER_NAME, make_certificates, needs_openssl
from tests.service.server_process import start_server, stop_server, wait_ready, wait_until

GOOD, CHAT_ONLY, ROTATED = "k3y-all-methods-7d1f", "k3y-chat-only-91ab", "k3y-rotated-55c0"
HI = pb.GenerateRequest(prompt=pb.Prompt(text="Hi"), limits=pb.GenerationLimits(max_new_tokens=1))
CHAT = pb.ChatRequest(
    messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Hi")],
    limits=pb.GenerationLimits(max_new_tokens=1),
)


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


@pytest.fixture(scope="module")
def keyed(cache_dir, cached_embedded_checkpoint, tmp_path_factory):
    keys = tmp_path_factory.mktemp("secret") / "api-keys"
    keys.write_text(f"# mounted from a Secret\n{GOOD}\n{CHAT_ONLY} Chat,ChatStream\n")
    server = start_server(cache_dir, "--api-keys-file", str(keys))
    wait_ready(server)  # health stays open: no key needed
    yield server, keys
    assert stop_server(server) == 0


def _code(call, request, metadata=()):
    try:
        call(request, timeout=30, metadata=list(metadata))
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def test_api_keys_refuse_with_the_right_status_and_serve_with_a_good_key(keyed):
    server, _ = keyed
    api = server.api
    code, detail = _code(api.Generate, HI)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in detail
    assert _code(api.Generate, HI, _bearer("wrong"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _code(api.Generate, HI, [("authorization", GOOD)])[0] == (
        grpc.StatusCode.UNAUTHENTICATED  # the scheme is required
    )
    code, detail = _code(api.Generate, HI, _bearer(CHAT_ONLY))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "may call Chat, ChatStream" in detail
    assert _code(api.Chat, CHAT, _bearer(CHAT_ONLY))[0] == grpc.StatusCode.OK
    assert _code(api.Generate, HI, _bearer(GOOD))[0] == grpc.StatusCode.OK
    stream = api.GenerateStream(pb.GenerateStreamRequest(prompt=HI.prompt), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        list(stream)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.status("readiness") == health_pb2.HealthCheckResponse.SERVING


def _triton_inputs() -> list:
    """A short KServe request (two tokens: quick on a loaded machine)."""
    import numpy as np
    import tritonclient.grpc as triton

    tensors = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([[b"Hi"]], dtype=object)),
        ("max_tokens", "INT32", np.array([[2]], dtype=np.int32)),
    ):
        tensor = triton.InferInput(name, [1, 1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def test_the_kserve_api_takes_the_same_keys_and_leaves_its_probes_open(keyed):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    server, _ = keyed
    text = _triton_inputs()
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_server_live() and client.is_server_ready()  # probes: no key
        for headers, status in (
            (None, "StatusCode.UNAUTHENTICATED"),
            ({"authorization": "Bearer wrong"}, "StatusCode.UNAUTHENTICATED"),
            ({"authorization": f"Bearer {CHAT_ONLY}"}, "StatusCode.PERMISSION_DENIED"),
        ):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("ensemble", text, headers=headers)
            assert refused.value.status() == status
        good = {"authorization": f"Bearer {GOOD}"}
        assert client.is_model_ready("ensemble", headers=good)
        (out,) = client.infer("ensemble", text, headers=good).as_numpy("text_output")
        assert out.decode().startswith("Hi")


def test_reflection_stays_open_for_grpcurl(keyed, grpcurl):
    server, _ = keyed
    listed = subprocess.run(
        [grpcurl, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=60
    )
    assert "nemotron.v1.GenerationService" in listed.stdout
    called = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: Bearer {GOOD}", "-d",
         json.dumps({"prompt": {"text": "Hi"}, "limits": {"max_new_tokens": 1}}),
         server.address, "nemotron.v1.GenerationService/Generate"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert called.returncode == 0, called.stderr


def _serves(server, key: str) -> bool:
    return _code(server.api.Generate, HI, _bearer(key))[0] == grpc.StatusCode.OK


def test_a_rotated_key_file_takes_effect_without_a_restart(keyed):
    import queue

    import tritonclient.grpc as triton

    server, keys = keyed
    text = _triton_inputs()
    answers: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(server.address)
    client.start_stream(  # a KServe stream opened with a key that is about to go
        callback=lambda result, error: answers.put(error),
        headers={"authorization": f"Bearer {GOOD}"},
    )
    client.async_stream_infer("ensemble", text, request_id="before")
    assert answers.get(timeout=60) is None
    keys.write_text(f"{ROTATED}\n")
    # The server looks at the file at most once a second (RELOAD_CHECK_S), on a call.
    wait_until(lambda: _serves(server, ROTATED), "the new key to be picked up", interval_s=0.3)
    assert _code(server.api.Generate, HI, _bearer(GOOD))[0] == grpc.StatusCode.UNAUTHENTICATED
    client.async_stream_infer("ensemble", text, request_id="after")  # the stream is still open
    assert "invalid API key" in str(answers.get(timeout=60))
    client.stop_stream()
    client.close()
    keys.write_text(f"{GOOD}\n{CHAT_ONLY} Chat,ChatStream\n")  # back for the other tests
    wait_until(lambda: _serves(server, GOOD), "the first keys to be back", interval_s=0.3)


def _refused(line: dict) -> bool:
    return line["event"] == "rpc_refused"


def test_keys_never_reach_the_logs(keyed):
    server, _ = keyed
    refused_before = len([line for line in server.log_lines() if _refused(line)])
    _code(server.api.Generate, HI, _bearer("a-wrong-key-that-must-not-be-logged"))
    server.wait_for_log(_refused, "the refusal", count=refused_before + 1)
    text = server.log_path.read_text()
    assert "rpc_refused" in text
    for secret in (GOOD, CHAT_ONLY, ROTATED, "a-wrong-key-that-must-not-be-logged"):
        assert secret not in text


def test_an_unreadable_key_file_stops_startup_with_a_clear_error(cache_dir, tmp_path):
    result = subprocess.run(
        [
            *_serve_command(),
            "--cache-dir", str(cache_dir), "--port", "0", "--metrics-port", "0",
            "--http-port", "off",
            "--api-keys-file", str(tmp_path / "missing"),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot read the API key file" in result.stderr and "Traceback" not in result.stderr


def _serve_command() -> list[str]:
    import shutil
    import sys

    return [shutil.which("nemotron-serve") or f"{sys.prefix}/bin/nemotron-serve"]


def _long_chat(request_id: str) -> pb.ChatStreamRequest:
    return pb.ChatStreamRequest(
        request_id=request_id,
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Count to a thousand.")],
        limits=pb.GenerationLimits(max_new_tokens=4000, ignore_eos=True),
    )


def test_a_tenant_can_neither_abort_nor_collide_with_another_tenants_request(keyed):
    """Key A (every method) aborts key B's request id: nothing happens to B's stream, and A
    using the same id is its own request, not an 'in use' error that reveals B's."""
    server, _ = keyed
    api = server.api
    b_stream = api.ChatStream(_long_chat("tenantB-1"), timeout=600, metadata=_bearer(CHAT_ONLY))
    first = next(b_stream)  # B's request is in flight
    assert first.request_id == "tenantB-1"
    try:
        aborted = api.Abort(
            pb.AbortRequest(request_id="tenantB-1"), timeout=60, metadata=_bearer(GOOD)
        )
        assert aborted.aborted is False
        same_id = pb.GenerateRequest(request_id="tenantB-1", prompt=HI.prompt, limits=HI.limits)
        reply = api.Generate(same_id, timeout=120, metadata=_bearer(GOOD))
        assert reply.request_id == "tenantB-1" and len(reply.token_ids) == 1
        # B's stream goes on: on the old code A's Abort ended it with FINISH_REASON_ABORTED.
        later = [next(b_stream) for _ in range(20)]
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in later)
    finally:
        b_stream.cancel()


def test_a_tenant_aborts_its_own_request_by_its_own_id(keyed):
    server, _ = keyed
    api = server.api
    stream = api.ChatStream(_long_chat("mine-1"), timeout=600, metadata=_bearer(GOOD))
    next(stream)
    assert api.Abort(
        pb.AbortRequest(request_id="mine-1"), timeout=30, metadata=_bearer(GOOD)
    ).aborted
    assert list(stream)[-1].finish_reason == pb.FINISH_REASON_ABORTED


@needs_openssl
def test_mutual_tls_serves_clients_with_a_certificate_and_refuses_others(
    cache_dir, cached_embedded_checkpoint, tmp_path
):
    files = make_certificates(tmp_path)
    options = (("grpc.ssl_target_name_override", SERVER_NAME),)
    client = grpc.ssl_channel_credentials(files["ca.pem"], files["client.key"], files["client.pem"])
    server = start_server(
        cache_dir,
        "--tls-cert-file", str(tmp_path / "server.pem"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-client-ca-file", str(tmp_path / "ca.pem"),
        credentials=client,
        channel_options=options,
    )  # fmt: skip
    try:
        wait_ready(server)
        answer = server.api.Generate(HI, timeout=30)
        assert len(answer.token_ids) == 1
        for credentials in (grpc.ssl_channel_credentials(files["ca.pem"]), None):
            channel = (
                grpc.secure_channel(server.address, credentials, options)
                if credentials
                else grpc.insecure_channel(server.address)
            )
            with channel, pytest.raises(grpc.RpcError) as refused:
                pb_stub(channel).Generate(HI, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert stop_server(server) == 0


def pb_stub(channel: grpc.Channel):
    from nemotron.v1 import generation_pb2_grpc as pb_grpc

    return pb_grpc.GenerationServiceStub(channel)
