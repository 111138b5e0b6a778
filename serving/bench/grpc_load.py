"""The gRPC side of `make bench-serving`: a load generator that is not the bottleneck, and the bare gRPC server.

grpcio's own Python client costs more per call than the server it measures (about 0.25 ms a call here), so the load
is sent as wrk sends HTTP: prepared requests written straight to HTTP/2 connections, one call at a time on each
(concurrency = connections), the answers read as frames. A request is the gRPC message of a PredictRequest, made once
before the run; an answer counts when its message came (a refusal has none: an error). HTTP/2's bookkeeping is
kept to what a gRPC server asks of a client: the preface and settings, their acknowledgements, pings answered,
flow-control windows opened wide at the start.

The limit (`limit_server`): grpcio's asyncio server on uvloop, the server's worker count sharing the port, parsing
the PredictRequest and answering a fixed prediction, the gRPC counterpart of the HTTP limit.
"""

import asyncio
import os
import random
import struct
import sys
import time
from typing import Any, Dict, List, Sequence

from models import features

METHOD = "/tensorflow.serving.PredictionService/Predict"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
WIDE_WINDOW = 2**31 - 1
FLAT_BODIES = 400_000  # distinct instances prepared for the flat workload: more than a run sends
TIMEOUT_SECONDS = 2.0  # a call unanswered this long is an error (wrk's --timeout in the HTTP rows)


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _literal(name_index: int, value: bytes) -> bytes:
    """An HPACK header field without indexing, its name from the static table (RFC 7541, 6.2.2)."""
    prefix = bytes([name_index]) if name_index < 15 else bytes([15, name_index - 15])
    return prefix + bytes([len(value)]) + value


def _request_head(authority: str) -> bytes:
    """The HEADERS block of every call: POST (static 3), http (6), the path (name 4), the authority (name 1),
    content-type (name 31) and te: trailers (a new name)."""
    return (
        b"\x83\x86"
        + _literal(4, METHOD.encode())
        + _literal(1, authority.encode())
        + _literal(31, b"application/grpc")
        + b"\x00\x02te\x08trailers"
    )


def message(body: bytes) -> bytes:
    """A gRPC message: not compressed, its length, the serialized request."""
    return b"\x00" + struct.pack(">I", len(body)) + body


class Connection(asyncio.Protocol):
    """One HTTP/2 connection making one call at a time."""

    def __init__(self, authority: str):
        self.head = _request_head(authority)
        self.buffer = b""
        self.stream = 1
        self.answered = False
        self.done: asyncio.Future = None
        self.transport = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, WIDE_WINDOW)  # no push; wide windows
        transport.write(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(0x8, 0, 0, struct.pack(">I", WIDE_WINDOW - 65535))  # the connection's window
        )

    def call(self, body: bytes) -> asyncio.Future:
        self.done = asyncio.get_running_loop().create_future()
        self.answered = False
        self.transport.write(
            _frame(HEADERS, END_HEADERS, self.stream, self.head) + _frame(DATA, END_STREAM, self.stream, body)
        )
        return self.done

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
            if kind == SETTINGS and not flags & ACK:
                self.transport.write(_frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.transport.write(_frame(PING, ACK, 0, payload))
            elif stream == self.stream:
                if kind == DATA and payload:
                    self.answered = True
                if kind == RST_STREAM or flags & END_STREAM and kind in (DATA, HEADERS):
                    self.stream += 2
                    if self.done is not None and not self.done.done():
                        self.done.set_result(self.answered and kind != RST_STREAM)
            elif kind == GOAWAY:
                self.transport.close()
        self.buffer = buffer

    def connection_lost(self, error: Any) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(False)


async def _drive(host: str, port: int, bodies: Sequence[bytes], concurrency: int, seconds: float) -> Dict:
    loop = asyncio.get_running_loop()
    latencies: List[float] = []
    errors = [0]
    deadline = time.perf_counter() + seconds
    rng = random.Random(concurrency)

    async def connect() -> Connection:
        return (await loop.create_connection(lambda: Connection(f"{host}:{port}"), host, port))[1]

    async def worker(index: int) -> None:
        connection = await connect()
        position = rng.randrange(len(bodies))
        while time.perf_counter() < deadline:
            body = bodies[position % len(bodies)]
            position += concurrency
            started = time.perf_counter()
            try:
                ok = await asyncio.wait_for(connection.call(body), TIMEOUT_SECONDS)
            except (
                asyncio.TimeoutError
            ):  # counted as wrk counts one; the call's stream is abandoned with its connection
                ok = False
                connection.transport.close()
                connection = await connect()
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors[0] += 1
        connection.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count + errors[0],
        "seconds": elapsed,
        "rps": count / elapsed,
        "p50_ms": latencies[count // 2] * 1e3 if count else float("nan"),
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1e3 if count else float("nan"),
        "non2xx": errors[0],
        "socket_errors": 0,
    }


def drive(host: str, port: int, bodies: Sequence[bytes], concurrency: int, seconds: float) -> Dict:
    """Calls at `concurrency` for `seconds`, the bodies taken in turn (each connection from its own place):
    the figures wrk gives (requests, rps, p50_ms, p99_ms; refusals and timeouts as non2xx)."""
    import uvloop

    return uvloop.run(_drive(host, port, bodies, concurrency, seconds))


def predict_body(instance: Dict[str, Any]) -> bytes:
    """The gRPC message of a serving_raw PredictRequest for one instance (a tensor per feature, as clients send)."""
    from tensorflow.core.framework import tensor_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "babyweight"
    request.model_spec.signature_name = "serving_raw"
    key = features.instance_key(instance)
    for index, column in enumerate(features.FEATURES):
        value = key[index]
        if column.dtype == "string":
            tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[(value or "").encode()])
        else:
            tensor = tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT, float_val=[float("nan") if value is None else value]
            )
        tensor.tensor_shape.dim.add(size=1)
        request.inputs[column.name].CopyFrom(tensor)
    return message(request.SerializeToString())


def flat_instances(count: int, seed: int) -> List[Dict[str, Any]]:
    """The flat workload's instances: every feature uniform over its range, as the HTTP bench's wrk script draws."""
    rng = random.Random(seed)
    return [
        {
            "mother_age": rng.randint(13, 50),
            "gestation_weeks": rng.randint(20, 46),
            "is_male": rng.choice(("true", "false")),
            "plurality": rng.randint(1, 3),
            "mother_married": rng.choice(("true", "false")),
            "weight_gain_pounds": rng.randint(0, 98),
            "ever_born": rng.randint(1, 12),
            "father_age": rng.randint(14, 70),
        }
        for _ in range(count)
    ]


def limit_server(port: int, workers: int) -> None:
    """The bare gRPC server: `workers` processes on `port` (SO_REUSEPORT), each parsing the request and answering a
    fixed prediction; runs until it is stopped."""
    if workers > 1:
        for _ in range(workers - 1):
            if os.fork() == 0:
                break
    import grpc
    import uvloop
    from tensorflow_serving.apis import predict_pb2

    answer = predict_pb2.PredictResponse()
    answer.outputs["predictions"].float_val.append(7.25)
    fixed = answer.SerializeToString()

    async def predict(request: Any, context: Any) -> bytes:
        return fixed

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        handler = grpc.unary_unary_rpc_method_handler(
            predict, request_deserializer=predict_pb2.PredictRequest.FromString, response_serializer=lambda b: b
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {"Predict": handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


if __name__ == "__main__":  # python -m serving.bench.grpc_load PORT WORKERS: the limit server
    limit_server(int(sys.argv[1]), int(sys.argv[2]))
