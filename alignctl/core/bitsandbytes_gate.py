"""bitsandbytes is imported only by a run that quantises.

peft imports bitsandbytes whenever it is installed (`import peft` -> peft.helpers), and importing
bitsandbytes on a CPU with AVX512-BF16 asks the Hugging Face hub for an optional kernel: a network
call at import time, and a line on stderr from `kernels` when it cannot verify or reach the hub
(offline clusters, CI, these machines). Neither is the business of a run that does not quantise.

The CLI holds bitsandbytes back before anything imports peft: a `None` entry in `sys.modules` makes
`import bitsandbytes` fail with ImportError (which peft and transformers treat as "not installed")
and `importlib.util.find_spec` answer None. A run that quantises releases it first
(`models.four_bit_config`); the availability checks peft and transformers cached meanwhile are
cleared so they look again.
"""

from __future__ import annotations

import logging
import sys

MODULE = "bitsandbytes"
# The libraries whose import-time chatter (a hub kernel that could not load, a trust check skipped
# offline) is not alignctl's to show: bitsandbytes falls back to its own CPU kernels.
CHATTY_LOGGERS = ("bitsandbytes", "kernels")


def quiet_loggers() -> None:
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def hold_back() -> None:
    """Hide bitsandbytes from this process until `release()`; a no-op once it is imported."""
    quiet_loggers()
    sys.modules.setdefault(MODULE, None)  # type: ignore[arg-type]


def held_back() -> bool:
    return MODULE in sys.modules and sys.modules[MODULE] is None


def release() -> None:
    """Make bitsandbytes importable again, for a run that quantises."""
    quiet_loggers()
    if not held_back():
        return
    del sys.modules[MODULE]
    _forget_cached_availability()


def _forget_cached_availability() -> None:
    forget_cached_answers()
    if "peft.helpers" in sys.modules:  # it bound `bnb = None` when the import failed
        import bitsandbytes

        sys.modules["peft.helpers"].bnb = bitsandbytes


def forget_cached_answers() -> None:
    """peft and transformers cache 'is bitsandbytes installed?' (functools.lru_cache) on first ask."""
    checks = []
    if "peft.import_utils" in sys.modules:
        from peft import import_utils

        checks += [import_utils.is_bnb_available, import_utils.is_bnb_4bit_available]
    if "transformers.utils.import_utils" in sys.modules:
        from transformers.utils import import_utils as hf_import_utils

        checks.append(hf_import_utils.is_bitsandbytes_available)
    for check in checks:
        getattr(check, "cache_clear", lambda: None)()
