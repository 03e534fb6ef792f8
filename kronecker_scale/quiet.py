"""Quiet by default: hide the notices megatron-core, DeepSpeed and torch print on every start.

Each process of a run (the `kscale` process and every rank) would otherwise print about ten of them:
Apex / Transformer Engine are absent (the CPU and plain-torch set-ups never have them), deprecations
inside the libraries, DeepSpeed choosing the CPU accelerator. They say nothing about the run, and they
bury the lines that do. `install(verbose)` hides exactly the notices listed in KNOWN and counts them;
anything else (every unknown warning, log record or line) is shown as before, and with verbose=True
everything is shown. `summary()` is the one line that says what was hidden.

How each notice is emitted decides how it is caught (checked against the 0.19 releases):
- `warnings.warn` (megatron, torch): a `warnings.showwarning` hook; also a filter on the `py.warnings`
  logger, for a process that routes warnings into logging (logging.captureWarnings);
- `logging` (megatron's module loggers, DeepSpeed's "DeepSpeed" logger with its own stdout handler): a
  filter on the logger that emits it, and one on logging's last-resort handler;
- `print` (DeepSpeed's op builder): sys.stdout is wrapped; a write that is exactly a known line (and
  print's newline after it) is dropped, every other write goes straight through, unbuffered.

Call `install(os.environ.get("KSCALE_VERBOSE") == "1")` at process start, before megatron.core or
deepspeed is imported (some notices are emitted at import time); `kscale --verbose` sets KSCALE_VERBOSE=1
so that rank processes inherit it.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    label: str  # what the summary calls it
    library: str  # who emits it
    channel: str  # warnings | logging | print
    regex: str  # searched in the message text
    logger: str | None = None  # channel logging: the logger that emits it

    def matches(self, text: str) -> bool:
        """A printed line must be the notice exactly; a warning or log message need only contain it."""
        pattern = _compiled(self.regex)
        return bool(pattern.fullmatch(text) if self.channel == "print" else pattern.search(text))


KNOWN: tuple[Notice, ...] = (
    # megatron-core 0.19: Apex / Transformer Engine fallbacks (import time) and deprecations
    Notice(
        "Apex/TE absent: torch optimizers",
        "megatron-core",
        "warnings",
        r"Transformer Engine and Apex are not installed\. Falling back to Torch optimizers",
    ),
    Notice(
        "Apex/TE absent: local multi-tensor ops",
        "megatron-core",
        "warnings",
        r"Transformer Engine and Apex are not installed\. Falling back to local implementations of "
        r"multi_tensor_applier",
    ),
    Notice(
        "Apex absent: torch norm", "megatron-core", "warnings", r"Apex is not installed\. Falling back to Torch Norm"
    ),
    Notice(
        "cuda-graph 'full scope' deprecation",
        "megatron-core",
        "warnings",
        r"full scope is deprecated\. Use empty cuda_graph_modules",
    ),
    Notice(
        "MimoModelConfig experimental",
        "megatron-core",
        "warnings",
        r"MimoModelConfig is experimental and still under active development",
    ),
    Notice(
        "MCore async save deprecation",
        "megatron-core",
        "logging",
        r"MCore's async save is deprecated",
        logger="megatron.core.dist_checkpointing.strategies.torch",
    ),
    # torch, as megatron's dist_checkpointing and DeepSpeed call it
    Notice(
        "ShardedTensor deprecation",
        "torch",
        "warnings",
        r"Please use DTensor instead and we are deprecating ShardedTensor",
    ),
    Notice("DCP load argument order", "torch", "warnings", r"The argument order of load has been changed"),
    Notice(
        "DCP single-process load",
        "torch",
        "warnings",
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
        r"in a single process",
    ),
    Notice(
        "all_gather_into_tensor deprecation",
        "torch",
        "warnings",
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    ),
    # DeepSpeed 0.19.8
    Notice(
        "DeepSpeed CPU accelerator",
        "deepspeed",
        "logging",
        r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it",
        logger="DeepSpeed",
    ),
    Notice("DeepSpeed shm comm op built", "deepspeed", "print", r"DeepSpeed \S+ built successfully"),
)

_patterns: dict[str, re.Pattern] = {}


def _compiled(regex: str) -> re.Pattern:
    if regex not in _patterns:
        _patterns[regex] = re.compile(regex)
    return _patterns[regex]


_lock = threading.Lock()
_counts: Counter = Counter()  # label -> notices hidden in this process (insertion = first seen)
_state: dict = {}  # what install() replaced, to undo it


def match(text: str, channel: str | None = None) -> Notice | None:
    """The known notice `text` is, if any (`channel`: only notices emitted that way)."""
    for n in KNOWN:
        if (channel is None or n.channel == channel) and n.matches(text):
            return n
    return None


def _hide(text: str, channel: str | None = None) -> bool:
    n = match(text, channel)
    if n is None:
        return False
    with _lock:
        _counts[n.label] += 1
    return True


# --- warnings ---------------------------------------------------------------------------------
def _showwarning(message, category, filename, lineno, file=None, line=None):
    if _hide(str(message)):
        return
    _state["showwarning"](message, category, filename, lineno, file, line)


# --- logging ----------------------------------------------------------------------------------
class _LogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not _hide(text)


_LOG_FILTER = _LogFilter()


def _filtered_loggers() -> list[logging.Logger]:
    names = {n.logger for n in KNOWN if n.logger} | {"py.warnings"}
    return [logging.getLogger(name) for name in sorted(names)]


# --- print ------------------------------------------------------------------------------------
class _QuietStream:
    """Wraps sys.stdout: drops a write that is exactly a known printed line, and print's newline after
    it; passes every other write through at once (no buffering)."""

    def __init__(self, stream):
        self._stream = stream
        self._drop_newline = False

    def write(self, s):
        if self._drop_newline:
            self._drop_newline = False
            if s == "\n":
                return len(s)
        line = s.rstrip("\n")
        if line and "\n" not in line and _hide(line, "print"):
            self._drop_newline = not s.endswith("\n")
            return len(s)
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)


# --- the two entry points ---------------------------------------------------------------------
def install(verbose: bool) -> None:
    """Hide (and count) the KNOWN notices in this process; verbose=True shows everything (and undoes an
    earlier install). Idempotent. Call it before megatron.core or deepspeed is imported."""
    with _lock:
        if verbose:
            _uninstall()
            return
        if _state:
            return
        _state["showwarning"] = warnings.showwarning
        warnings.showwarning = _showwarning
        for lg in _filtered_loggers():
            lg.addFilter(_LOG_FILTER)
        if logging.lastResort is not None:
            logging.lastResort.addFilter(_LOG_FILTER)
        if any(n.channel == "print" for n in KNOWN):
            _state["stdout"] = sys.stdout
            sys.stdout = _QuietStream(sys.stdout)


def _uninstall() -> None:
    if not _state:
        return
    if warnings.showwarning is _showwarning:
        warnings.showwarning = _state["showwarning"]
    for lg in _filtered_loggers():
        lg.removeFilter(_LOG_FILTER)
    if logging.lastResort is not None:
        logging.lastResort.removeFilter(_LOG_FILTER)
    if "stdout" in _state and isinstance(sys.stdout, _QuietStream):
        sys.stdout = _state["stdout"]
    _state.clear()


def hidden() -> dict[str, int]:
    """label -> how many times this process hid it."""
    with _lock:
        return dict(_counts)


def summary() -> str | None:
    """One line saying what this process hid, or None if nothing was."""
    counts = hidden()
    if not counts:
        return None
    total = sum(counts.values())
    parts = ", ".join(f"{label} x{k}" for label, k in counts.items())
    return f"quiet: {total} known library notice{'s' if total != 1 else ''} hidden ({parts}); --verbose shows them"
