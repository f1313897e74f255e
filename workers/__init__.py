"""The data plane: models, the engine (scheduler, KV cache, runner) and the worker roles built on it."""
from partita.workers.config import EngineConfig, ModelConfig
from partita.workers.engine.engine import Engine
from partita.workers.engine.outputs import EngineStats, RequestOutput
from partita.workers.errors import (EngineCapacityError, InvalidRequestError, ModelLoadError,
                                    UnsupportedModelError)
from partita.workers.llm import LLM, CompletionOutput
from partita.workers.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Engine", "EngineConfig", "EngineStats", "ModelConfig", "RequestOutput",
           "SamplingParams", "InvalidRequestError", "ModelLoadError", "UnsupportedModelError",
           "EngineCapacityError"]
