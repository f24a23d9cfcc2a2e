"""The bare floor for serve_bench.py: a minimal Starlette endpoint calling one ONNX Runtime session.

No validation, no cache, no logging, no metrics: what any server of this model costs at least. The one addition is the
event-loop lag probe `mlnb serve` runs too (a timer callback every 5 ms, `mlnb.serving.telemetry.LoopLag`), read at
/metrics, so that the benchmark compares both servers' longest stalls measured the same way.
Run: MODEL=path/to/model.onnx uvicorn benchmarks.floor_app:app --loop uvloop --http httptools
"""
import asyncio, contextlib, os

import numpy as np
import onnxruntime as ort
import orjson
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from mlnb.serving.telemetry import LAG_BUCKETS, LoopLag

options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
session = ort.InferenceSession(os.environ["MODEL"], options, providers=["CPUExecutionProvider"])
inputs = [(i.name, object if i.type == "tensor(string)" else np.float32) for i in session.get_inputs()]
outputs = [o.name for o in session.get_outputs()]


async def invocations(request):
    records = orjson.loads(await request.body())["dataframe_records"]
    feed = {name: np.array([[r[name]] for r in records], dtype=dtype) for name, dtype in inputs}
    result = dict(zip(outputs, session.run(None, feed)))
    return Response(orjson.dumps({"predictions": [{"label": str(l), "probabilities": p.tolist()} for l, p in zip(result["label"], result["probabilities"])]}),
                    media_type="application/json")

async def ping(request): return Response(b"")          # readiness, for the benchmark to wait on

registry = CollectorRegistry()
lag = Histogram("mlnb_event_loop_lag_seconds", "event-loop lag", buckets=LAG_BUCKETS, registry=registry)

async def metrics(request): return Response(generate_latest(registry), media_type="text/plain")

@contextlib.asynccontextmanager
async def lifespan(app):
    probe = LoopLag(asyncio.get_running_loop(), lag)
    yield
    probe.close()

app = Starlette(routes=[Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping), Route("/metrics", metrics)],
                lifespan=lifespan)
