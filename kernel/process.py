"""Starting and ending a process that runs one ``modelloop`` command, without paying for
what the command does not use.

``modelloop`` started from a shell (the console script, ``python -m modelloop``) owns its
interpreter: it runs one command and exits. A library caller (``modelloop.sft`` in a
notebook, ``main()`` in a test, a recipe's later stages) may run more in the same
interpreter, so only an owned process may:

- keep libraries its run does not use out of its imports (``leave_out``). transformers,
  accelerate and peft import some libraries whenever they are installed: bitsandbytes
  (peft, and bitsandbytes ``torch.compile``-decorates its CPU ops as it is imported) and
  deepspeed (accelerate and transformers). Measured on a LoRA run on this repository's
  CPU stack: 1.2 s and 60 MiB of peak memory (``bench/sft_throughput.py``).
- keep freed memory for reuse (``keep_freed_memory``): a training step frees and
  allocates the same tensors again, and glibc hands each one over a few hundred KiB back
  to the kernel and then takes it again, page by page. Keeping it makes a LoRA step on a
  CPU 3 to 8% faster for 20 MiB more peak memory (measured on the peer-baseline run).
- end without tearing the interpreter down (``end``): clearing the modules and objects
  that torch, transformers and peft leave behind takes about 1.3 s once the work is done.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import platform
import sys
import threading
from collections.abc import Iterable
from typing import NoReturn

#: Libraries that transformers, accelerate or peft import as soon as they are installed,
#: which a run uses only when its tuner, strategy, accelerators or weights need them.
EAGERLY_IMPORTED = ("bitsandbytes", "deepspeed")


def leave_out(names: Iterable[str]) -> list[str]:
    """Make each of ``names`` not imported yet look uninstalled for the rest of this
    process: ``import`` raises ImportError and ``importlib.util.find_spec`` returns None,
    which is how libraries check for optional ones. Returns the names left out.

    Irreversible by design: a library that imported while one was left out has already
    decided it is missing, so only a process that runs nothing else afterwards may call it.
    """
    left = []
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not available" marker
            left.append(name)
    return left


#: glibc's ``mallopt`` parameters, and what they are set to: blocks up to 32 MiB (glibc's
#: largest threshold) come from the heap, and up to 256 MiB of free heap is kept.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20}


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed blocks for the next allocation instead of
    returning them to the kernel. Both thresholds go together: fixing the trim threshold
    alone turns off glibc's adaptive mmap threshold, and every large block is then mapped
    afresh. Returns False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in KEPT.items())


def end(code: object = 0) -> NoReturn:
    """Exit as ``sys.exit(code)`` would, without the interpreter's teardown.

    What a normal exit does before its teardown is done here, in its order: threads are
    shut down as the interpreter does it (pools told to stop, non-daemon threads joined),
    ``atexit`` handlers run (logging, multiprocessing, tracker uploads), and the standard
    streams are flushed. Only the clearing of modules and objects is skipped.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit's convention: anything else is a message, and failure
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    os._exit(code)
