"""An echo model: the smallest useful model class.

POST {"text": "hi"} returns {"echo": "hi", "request_id": ...}; with
"stream": true the text comes back one word per chunk.
"""

from starlette.requests import Request


class Model:
    def __init__(self, config, **kwargs):
        self._name = config.get("model_name", "echo-model")

    def load(self):
        pass

    def predict(self, model_input, request: Request):
        text = str(model_input.get("text", ""))
        if model_input.get("stream"):
            return (word + " " for word in text.split())
        return {
            "model": self._name,
            "echo": text,
            "request_id": request.headers.get("x-baseten-request-id"),
        }
