"""Serving (`softprompt serve`): many published prompts on one frozen base model, on Ray Serve.

The core lives here and runs without Ray: the settings (`config.py`), what a client may send
(`requests.py`), the prompts served and their refreshed versions (`live.py`), and rows to
predictions in mixed batches (`predictor.py`). The Ray Serve deployment, its HTTP routes and
`softprompt serve`'s start and stop are the Ray layer's (`softprompt.ray.serving`).
"""

from softprompt.serve.config import TOKEN_ENV, ServeConfig
from softprompt.serve.requests import ROUTES, RequestError, parse_request

__all__ = ["ROUTES", "TOKEN_ENV", "RequestError", "ServeConfig", "parse_request"]
