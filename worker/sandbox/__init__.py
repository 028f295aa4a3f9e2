"""A sandbox around every load of an untrusted model: the defence that holds when a check is wrong.

A model file comes from people we do not control, and loaders run code (pickles, TorchScript,
SavedModel init ops). The plugins' checks refuse what they recognise; this sandbox bounds what
gets past them. ``convert_model`` runs a converter's ``convert(request)`` in a child process under
bubblewrap (``bubblewrap``):

* no network (its own network namespace: only its own loopback), its own pid, ipc and uts
  namespaces, no new user namespaces, a new session;
* the filesystem read-only, the worker's home, ``/tmp``, ``/run``, the modelyard home (the stack
  file), the folder of ``GOOGLE_APPLICATION_CREDENTIALS`` and a ``file://`` artifact store hidden,
  and writable only its scratch folder (``/tmp/job``: the workdir; the source bound read-only);
* an environment built from nothing: PATH, PYTHONPATH for the project, HF_HUB_OFFLINE=1, thread
  settings, a HOME in the scratch folder; no Redis URL, password or cloud credential;
* rlimits on memory, CPU time, file size and processes (``MODELYARD_SANDBOX_*``) that the kernel
  enforces: the child is never root. A non-root worker (the image, Kubernetes) runs bwrap
  unprivileged in a user namespace; each sandbox then counts its own processes. A root worker
  runs bwrap as root (it can bind an interpreter under /root, which an unprivileged bwrap cannot
  reach) and the child drops to a uid of its own before it reads the request: as uid 0, even
  without capabilities, RLIMIT_NPROC would not bind (the kernel exempts the root user).

What a job is told: a UserInputError raised in the child keeps its message; running out of
memory, CPU time, file size or processes, a crash (a signal) and the wall-clock limit each become
a UserInputError that names the limit and its setting. The worker process itself stays up.

``MODELYARD_SANDBOX=off`` is the operator's explicit opt-out: the load runs in the worker
process, the worker says so loudly at start, and each convert manifest records ``sandbox: off``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

from worker.sandbox.status import SandboxStatus, require_sandbox, sandbox_status

if TYPE_CHECKING:  # importing the plugin base imports every plugin: the child and worker start stay light
    from worker.plugins.base import Converter, ConvertRequest, ConvertResult

__all__ = ["SandboxStatus", "convert_model", "sandbox_status"]


def convert_model(converter: type[Converter], request: ConvertRequest, *,
                  architecture: dict | None = None) -> tuple[ConvertResult, dict]:
    """``converter().convert(request)``, sandboxed unless MODELYARD_SANDBOX=off: (result, sandbox record).

    ``architecture``: a student pruned by the compress stage, which ``worker.compress.cnn.build``
    rebuilds (bound around the conversion, in whichever process runs it).
    """
    if request.settings.sandbox == "off" or not converter.sandboxed:
        binding = nullcontext()
        if architecture:
            from worker.compress import cnn

            binding = cnn.bound(architecture)
        with binding:
            result = converter().convert(request)
        reason = "MODELYARD_SANDBOX=off" if converter.sandboxed else f"plugin {converter.name} sets sandboxed = False"
        return result, {"mode": "off", "reason": reason}
    from worker.sandbox.conversion import convert_in_sandbox

    require_sandbox(request.settings)
    return convert_in_sandbox(converter, request, architecture=architecture)
