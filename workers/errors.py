"""Errors the runtime raises to its callers (the gateway maps them to gRPC and HTTP statuses)."""


class InvalidRequestError(ValueError):
    """A request the engine refuses as given; `field` names the offending field (`prompt`, `max_tokens`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelLoadError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or malformed."""


class UnsupportedModelError(ModelLoadError):
    """A checkpoint whose architecture or feature partita does not implement."""


class EngineCapacityError(RuntimeError):
    """The KV cache cannot hold even one sequence of `max_model_len` tokens."""


class KvCapacityError(RuntimeError):
    """No room now for a migrated request's KV (free blocks or sequence slots); retry later or elsewhere."""
