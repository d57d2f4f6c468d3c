"""Property-based fuzzing of every RPC of the API on a real server, seeded and deterministic.

Messages are drawn from the protobuf descriptors themselves (every field, repeated fields,
oneofs, nested messages, open enums with undefined values, the whole range of each integer
type, NaN and infinities), plus raw bytes that are not a message at all. The only property:
each call ends with a typed status a client can act on (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION), never UNKNOWN, INTERNAL or UNAVAILABLE, and the
server stays ready and its engine idle afterwards.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from nemotron.v1 import generation_pb2 as pb

from tests.service.server_process import RunningServer, wait_until

pytestmark = pytest.mark.slow

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]
TYPED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type in INTS:
        low, high = INTS[field.type]
        return st.integers(max(low, -3), 40) | st.integers(low, high)  # near the edges, mostly
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 12)  # open enums: undefined values must be refused, not crash
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor` with a random subset of its fields set."""
    message = GetMessageClass(descriptor)()
    if descriptor.full_name == "google.protobuf.Struct":
        message.update(draw(st.dictionaries(st.text(max_size=8), JSON, max_size=4)))
        return message
    chosen_oneofs = {o.name: draw(st.sampled_from(list(o.fields))) for o in descriptor.oneofs}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen_oneofs[oneof.name] is not field:
            continue
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            values = st.deferred(lambda f=field: messages(f.message_type, depth + 1))
            if field.is_repeated:
                for value in draw(st.lists(values, max_size=3)):
                    getattr(message, field.name).add().CopyFrom(value)
            else:
                getattr(message, field.name).CopyFrom(draw(values))
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=4)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


def keep_it_short(message: Message) -> Message:
    """Bound the work a valid request can ask for (a few tokens), so the fuzz stays fast."""
    limits = getattr(message, "limits", None)
    if limits is not None and (
        not limits.HasField("max_new_tokens") or 1 <= limits.max_new_tokens <= 10**6
    ):
        limits.max_new_tokens = min(limits.max_new_tokens or 4, 4)
    return message


def call(server: RunningServer, method: str, body: bytes) -> grpc.StatusCode:
    """Send raw bytes to `method`; the status it ended with."""
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    channel = server.channel
    make = channel.unary_stream if descriptor.server_streaming else channel.unary_unary
    try:
        reply = make(path, request_serializer=None, response_deserializer=None)(body, timeout=60)
        if descriptor.server_streaming:
            list(reply)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def fuzz_method(server: RunningServer, method: str) -> None:
    descriptor = SERVICE.methods_by_name[method]
    requests = (
        messages(descriptor.input_type).map(keep_it_short).map(lambda m: m.SerializeToString())
    )
    bodies = requests | st.binary(max_size=120)

    @seed(20261130)
    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(bodies)
    def property_(body: bytes) -> None:
        code = call(server, method, body)
        assert code in TYPED, f"{method} answered {code.name} to {body!r}"

    property_()


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_every_rpc_answers_random_and_malformed_requests_with_typed_statuses(
    server: RunningServer, method: str
):
    fuzz_method(server, method)
    assert server.status("readiness") == 1  # SERVING
    stats = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=30)
    assert stats.waiting_requests == 0
    wait_until(
        lambda: (
            server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=30).running_requests == 0
        ),
        "the engine to be idle after the fuzz",
    )
