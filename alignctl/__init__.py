"""alignctl: config-driven preference alignment for language models."""

import logging

__version__ = "0.1.0"

# On CPU, every `import bitsandbytes` (pulled in by peft) warns that an optional hub kernel could not
# load. It is harmless (bitsandbytes falls back to its own CPU path), so keep it off the console.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
