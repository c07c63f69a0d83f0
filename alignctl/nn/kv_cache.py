"""The keyword that hands a KV cache to a transformers model's forward() and generate().

transformers 5.2x renamed it from ``past_key_values`` to ``cache`` (the old name still works but warns
on every call, and goes in 5.40 / 6.0); the older versions pyproject allows know only the old name.
generate() takes it through **kwargs, so the rename is read from the signature of the generation
step that receives it. Call sites pass ``**{CACHE_ARG: cache}``.
"""

from __future__ import annotations

import inspect

from transformers import GenerationMixin

CACHE_ARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"
