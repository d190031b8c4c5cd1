"""LitServe with dynamic batching (max_batch_size=8, batch_timeout=10 ms): the same model, weights and preprocessing.

The raw JPEG body reaches `decode_request` as bytes (FastAPI reads a non-JSON body as bytes for a `bytes`
parameter), so LitServe gets exactly the upload reloader gets, with no base64 or multipart in between.
"""

# No `from __future__ import annotations`: LitServe builds its FastAPI endpoint from decode_request's
# annotation object, and a string annotation would not resolve inside LitServe's module.

import argparse
from pathlib import Path
from typing import Annotated

import litserve as ls
import torch
from fastapi import Body

from bench.peers import PREPROCESSOR, load_resnet18, top_k

MAX_BATCH_SIZE = 8
BATCH_TIMEOUT_S = 0.01


class ResNetAPI(ls.LitAPI):
    def __init__(self, checkpoint: Path, bf16: bool = False) -> None:
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
        self.checkpoint = checkpoint
        self.bf16 = bf16

    def setup(self, device: str) -> None:
        model, self.sha256 = load_resnet18(self.checkpoint)
        # The same two free speedups reloader applies: channels_last weights and inference_mode.
        self.model = model.to(memory_format=torch.channels_last)

    def decode_request(self, request: Annotated[bytes, Body(media_type="image/jpeg")]) -> torch.Tensor:
        return PREPROCESSOR.load(request)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs).contiguous(memory_format=torch.channels_last)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        # --bf16: the one-line autocast a LitServe user would add, for a comparison at equal precision.
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float().softmax(dim=1)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict:
        return top_k(output, self.sha256)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bf16", action="store_true", help="run predict under bf16 autocast")
    args = parser.parse_args()
    server = ls.LitServer(ResNetAPI(args.checkpoint, args.bf16), accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
