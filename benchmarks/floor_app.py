"""The bare floor for serve_bench.py: a minimal Starlette endpoint calling one ONNX Runtime session.

No validation, no cache, no logging, no metrics: what any server of this model costs at least.
Run: MODEL=path/to/model.onnx uvicorn benchmarks.floor_app:app --loop uvloop --http httptools
"""
import os

import numpy as np
import onnxruntime as ort
import orjson
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

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

app = Starlette(routes=[Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping)])
