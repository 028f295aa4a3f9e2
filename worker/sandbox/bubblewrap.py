"""The bubblewrap command line of one sandbox: what the child sees, and the environment it gets.

The child sees the machine's filesystem read-only (``--ro-bind / /``: the interpreter, the
project and its packages load as they do in the worker), with these exceptions:

* empty read-only tmpfs over the places that hold the worker's secrets or other people's data:
  ``/tmp``, ``/var/tmp``, ``/run`` (Kubernetes mounts service account tokens under it), ``/root``,
  ``/home``, the worker's home, the modelyard home (``MODELYARD_HOME``: ``stack.json`` with the
  Redis password, the local stack's data), the folder of ``GOOGLE_APPLICATION_CREDENTIALS`` and a
  ``file://`` artifact store. A folder the child needs (the interpreter, its packages, the
  project, ``PYTHONPATH``) that lies under one of them is bound back read-only; one of them that
  is itself needed stays visible. A secret file still visible after that (a credentials file in
  the project folder) is covered by an empty file;
* a fresh ``/dev`` (null, zero, urandom, ... and nothing else; read-only) and a ``/proc`` of its
  own pid namespace, so no worker process is visible;
* ``/tmp/job``, the sandbox's scratch folder, writable: ``io`` (request and result), ``home`` and
  ``tmp``, with the workdir bound writable at ``/tmp/job/out`` and the source read-only at
  ``/tmp/job/source``.

Namespaces: all of them (``--unshare-all``): no network but its own loopback, its own pid
namespace (``--die-with-parent``: the sandbox ends with the worker process, and every process in
it ends with the child), no further user namespaces (``--disable-userns``), a new session (no
terminal injection). The environment is built from nothing: no ``MODELYARD_*`` setting, Redis
URL or cloud credential reaches the child.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.settings import Settings

BWRAP = "bwrap"
UID_BASE, UID_SPAN = 2_000_000_000, 1_000_000  # a root worker's sandboxes run as uids no account uses
INSIDE = Path("/tmp/job")  # the scratch folder as the child sees it
ALWAYS_HIDDEN = ("/tmp", "/var/tmp", "/run", "/var/run", "/root", "/home")
PASSED_ENV = (  # taken from the worker when set: thread counts and the plugins to import, no secrets
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "MODELYARD_PLUGIN_MODULES",
    "LANG", "LC_ALL", "TZ",
)
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the worker and shared packages


def sandbox_uid(pid: int | None = None) -> int:
    """The uid (and gid) a root worker's sandbox runs as: one per worker process, not 65534 for all.

    Without a user namespace RLIMIT_NPROC counts a uid's processes across the machine, so
    concurrent sandboxes sharing one uid would share one budget: a fork bomb in one would starve
    the others. Deriving the uid from the worker process's pid keeps concurrent sandboxes apart.
    """
    return UID_BASE + (os.getpid() if pid is None else pid) % UID_SPAN


def chown_tree(path: Path, uid: int) -> None:
    """Hand path (and everything under it, links not followed) to a root worker's sandbox uid."""
    os.chown(path, uid, uid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(Path(folder) / name, uid, uid, follow_symlinks=False)


def secret_files(settings: Settings, environ: dict[str, str]) -> list[Path]:
    """Files that hold worker secrets: the local stack's file, the cloud credentials file."""
    files = [settings.stack_file]
    if environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        files.append(Path(environ["GOOGLE_APPLICATION_CREDENTIALS"]))
    return [_absolute(path) for path in files]


def hidden_folders(settings: Settings, environ: dict[str, str]) -> list[Path]:
    """Folders the child sees as empty: temporary files, homes, and the folders of worker secrets."""
    folders = [Path(p) for p in ALWAYS_HIDDEN]
    folders.append(Path(environ.get("HOME") or "~").expanduser())
    folders.append(settings.home_dir)
    folders += [path.parent for path in secret_files(settings, environ)]
    store = urlparse(settings.resolved_artifact_store())
    if store.scheme == "file":
        folders.append(Path(unquote(store.path)))
    return _existing_folders(folders)


def needed_paths(environ: dict[str, str]) -> list[Path]:
    """What the child must be able to read: the interpreter, its packages, the project, PYTHONPATH."""
    candidates = [Path(sys.executable).parent, Path(os.path.realpath(sys.executable)).parent,
                  Path(sys.prefix), Path(sys.base_prefix), PROJECT_ROOT]
    candidates += [Path(path) for path in sysconfig.get_paths().values()]
    candidates += [Path(path) for path in site.getsitepackages()]
    candidates += [Path(entry) for entry in environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return _existing_folders(candidates)


def child_env(environ: dict[str, str]) -> dict[str, str]:
    """The child's whole environment."""
    python_path = [str(PROJECT_ROOT)] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {
        "PATH": os.pathsep.join(dict.fromkeys([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin",
                                               "/bin"])),
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(python_path)),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": str(INSIDE / "home"),
        "TMPDIR": str(INSIDE / "tmp"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.update({name: environ[name] for name in PASSED_ENV if name in environ})
    return env


def command(box: Path, *, source: Path, workdir: Path, hidden: Iterable[Path], needed: Iterable[Path],
            secrets: Iterable[Path], argv: list[str], privileged: bool) -> list[str]:
    """``bwrap ... -- argv``: box is bound at INSIDE, source (a file or folder) at INSIDE/source/<name>.

    ``privileged``: the worker runs as root. bwrap then needs no user namespace; it sets the
    sandbox up with root's reach (an interpreter under /root stays bindable) and the child drops
    to an unprivileged uid before it reads the request. Otherwise bwrap runs unprivileged in a
    user namespace of its own, as the worker's uid.
    """
    needed = list(needed)
    # A folder the child needs cannot be hidden as a whole (the project holding the credentials file):
    # the secret files in it are covered one by one below.
    hidden = [path for path in hidden if path not in needed]
    if privileged:  # a root worker: bwrap sets up as root, the child drops to its own uid (child.drop_root)
        args = [BWRAP, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    else:
        args = [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns"]
    args += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # Masks and the paths bound back inside them, shallowest first so that each lands on the right layer.
    ops = [(len(p.parts), 0, p) for p in hidden]
    ops += [(len(p.parts), 1, p) for p in needed if _under_any(p, hidden)]
    made: set[Path] = set()
    for _depth, kind, path in sorted(ops):
        if kind == 0:
            args += ["--tmpfs", str(path)]
            continue
        mask = max((h for h in hidden if _within(path, h)), key=lambda h: len(h.parts))
        for folder in reversed(path.parents):  # bwrap would make the folders on the way 0700: unreadable
            if mask in folder.parents and folder not in made:
                args += ["--perms", "0755", "--dir", str(folder)]
                made.add(folder)
        args += ["--ro-bind", str(path), str(path)]
    args += ["--bind", str(box), str(INSIDE),
             "--ro-bind", str(source), str(INSIDE / "source" / source.name),
             "--bind", str(workdir), str(INSIDE / "out")]
    for path in hidden:
        args += ["--remount-ro", str(path)]
    args += ["--remount-ro", "/dev"]
    for path in secrets:
        if _visible(path, hidden, needed):
            args += ["--ro-bind", "/dev/null", str(path)]
    return args + ["--chdir", str(INSIDE), "--", *argv]


def _visible(path: Path, hidden: list[Path], needed: list[Path]) -> bool:
    """Whether the child would still see an existing file at path after the masks and bind-backs."""
    if not path.is_file():
        return False
    masks = [h for h in hidden if _within(path, h)]
    if not masks:
        return True
    deepest_mask = max(masks, key=lambda p: len(p.parts))
    return any(_within(path, n) and len(n.parts) > len(deepest_mask.parts) for n in needed)


def _under_any(path: Path, folders: list[Path]) -> bool:
    return any(_within(path, folder) for folder in folders)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _absolute(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def _existing_folders(paths: Iterable[Path]) -> list[Path]:
    """Resolved (symlinks followed), existing folders, each once, never the root."""
    found: dict[Path, None] = {}
    for path in paths:
        real = _absolute(path)
        if real.is_dir() and real != Path("/"):
            found[real] = None
    return list(found)
