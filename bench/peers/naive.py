"""The blog-post server: FastAPI, the model in a global, a synchronous forward inside an async handler.

That forward blocks the event loop, so requests are served strictly one after another; it is what most
"serve a PyTorch model with FastAPI" tutorials do, and the baseline the field starts from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request

from bench.peers import PREPROCESSOR, load_resnet18, top_k


def build(checkpoint: Path) -> FastAPI:
    model, sha256 = load_resnet18(checkpoint)
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        data = await request.body()
        x = PREPROCESSOR.load(data).unsqueeze(0)
        with torch.no_grad():
            probs = model(x).softmax(dim=1)[0]
        return top_k(probs, sha256)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build(args.checkpoint), host="127.0.0.1", port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
