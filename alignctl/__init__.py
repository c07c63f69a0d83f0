"""alignctl: config-driven preference alignment for language models."""

from alignctl.core import bitsandbytes_gate

__version__ = "0.1.0"

# On CPU, `import bitsandbytes` (pulled in by peft) logs that an optional hub kernel could not load:
# harmless (bitsandbytes falls back to its own CPU path), so keep it off the console.
bitsandbytes_gate.quiet_loggers()
