"""Generate tokens with an onnxruntime-genai decoder folder on the NPU.

:class:`Generator` reads ``genai_config.json``, compiles a prefill and a decode program once,
keeps both resident on one device context sharing ONE weight image, and keeps the KV cache in a
device buffer across steps: per decode step only the token id and attention mask go in and the
logits come out (:mod:`.resident`). Greedy or top-k/top-p sampling with a seed, ``eos_token_id``
and ``max_length`` stop the loop.

Layering: sits on top of ``dispatch`` (like ``cli``).
"""

from npudispatch.generate.config import GenaiConfig
from npudispatch.generate.generator import GenerationResult, Generator
from npudispatch.generate.sampling import SearchOptions

__all__ = ["GenaiConfig", "GenerationResult", "Generator", "SearchOptions"]
