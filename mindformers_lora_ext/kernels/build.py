"""Build cache of the CPU kernel library (standard library only; no MindSpore import).

The C++ sources ship with the package (``kernels/cpu/``) and are compiled on first use, not at
install time: the wheel stays pure Python (no compiler needed to install, one wheel for every
machine), an editable install picks up source edits, and the library is built with the compiler
of the machine that runs it. A machine without a compiler just runs the plain MindSpore
composition (one warning).

Where: ``<root>/<key>/fused_lora_cpu.so`` where ``<root>`` is ``$MINDFORMERS_LORA_EXT_KERNEL_CACHE``
if set, else ``$XDG_CACHE_HOME/mindformers_lora_ext/kernels``, else
``~/.cache/mindformers_lora_ext/kernels``; ``<key>`` is the first 20 hex digits of the SHA-256 of
the sources, the compiler's path and ``--version`` banner, the flags, the ABI version and the
machine type, so an edit, a compiler upgrade or a flag change builds a new library and never
loads a stale one. ``$MINDFORMERS_LORA_EXT_CPU_LIB`` names a prebuilt library instead (no build).

Safety: directories we create are mode 0700; an existing cache directory must belong to the
current user and must not be group- or world-writable, or the build is refused (a library
someone else can swap is code execution). The compiler is run with an argument list (no shell),
``$CXX`` (default ``g++``) resolved with ``shutil.which``. Flags are portable: ``-O3 -pthread``
and no ``-march``; the source selects AVX-512 / AVX2+FMA / generic code at run time (CPUID).

Concurrency (e.g. msrun workers starting together): builders serialise on an ``flock`` of
``<key>/.lock``; the compiler writes a temporary file in the same directory, which is renamed
over the final name (``os.replace``, atomic on POSIX) only after it compiled and loaded, so a
reader sees either no library or a complete one. A cached library that does not load (damaged)
is rebuilt the same way.

MindSpore's ``MS_CUSTOM_AOT_WHITE_LIST``, if set, must contain the cache directory (set
``$MINDFORMERS_LORA_EXT_KERNEL_CACHE`` inside it), otherwise the layers fall back (one warning).
"""
import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile

ABI_VERSION = 5  # must equal FLK_ABI_VERSION in cpu/fused_lora.cc
LIB_NAME = "fused_lora_cpu.so"
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu")
SOURCES = ("fused_lora.cc", "fused_lora_isa.inc", "dropped_matmul.cc", "aot_abi.h", "thread_pool.h")
COMPILED = tuple(name for name in SOURCES if name.endswith(".cc"))  # .inc, .h: included
CXXFLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
            "-ffp-contract=fast", "-fno-math-errno", "-Wall")
ENV_CACHE = "MINDFORMERS_LORA_EXT_KERNEL_CACHE"
ENV_LIB = "MINDFORMERS_LORA_EXT_CPU_LIB"
COMPILE_TIMEOUT = 600


class BuildError(RuntimeError):
    """The CPU kernel library could not be built or loaded (the message says why)."""


def cache_root() -> str:
    """The directory that holds one sub-directory per build key."""
    if os.environ.get(ENV_CACHE):
        return os.path.abspath(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "mindformers_lora_ext", "kernels")


def find_compiler() -> str:
    """Absolute path of ``$CXX`` (default g++); BuildError if there is none."""
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if not path:
        raise BuildError(f"no C++ compiler: {name!r} not found on PATH (set CXX)")
    return os.path.abspath(path)


def _compiler_banner(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run the compiler {cxx}: {exc}") from exc
    if done.returncode != 0:
        raise BuildError(f"{cxx} --version failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def build_key(cxx: str) -> str:
    """Hash of everything the library depends on (see the module docstring)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        try:
            with open(os.path.join(SOURCE_DIR, name), "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise BuildError(f"kernel source {name} is not installed ({exc}); the package data "
                             f"kernels/cpu/*.cc, *.inc must ship with the package") from exc
        digest.update(f"{name}:{len(data)}:".encode())
        digest.update(data)
    for part in (cxx, _compiler_banner(cxx), " ".join(CXXFLAGS), str(ABI_VERSION), platform.machine()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:20]


def _secure_dir(path: str) -> None:
    """Create ``path`` (and missing parents) mode 0700; refuse a directory others can write."""
    missing = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    info = os.stat(path)
    if info.st_uid != os.getuid():
        raise BuildError(f"kernel cache {path} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BuildError(f"kernel cache {path} is group/world-writable (mode {oct(info.st_mode & 0o777)}); "
                         f"fix it (chmod 700) or set {ENV_CACHE}")


def check_library(path: str) -> str:
    """Load ``path`` with ctypes and check its ABI version; returns the absolute path."""
    path = os.path.abspath(path)
    try:
        lib = ctypes.CDLL(path)
        version = lib.flk_abi_version()
    except (OSError, AttributeError) as exc:
        raise BuildError(f"cannot load the kernel library {path}: {exc}") from exc
    if version != ABI_VERSION:
        raise BuildError(f"kernel library {path} has ABI {version}, expected {ABI_VERSION}")
    return path


def library_isa(path: str) -> str:
    """The instruction set ("avx512", "avx2" or "generic") the library at ``path`` runs here."""
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.flk_isa.restype = ctypes.c_char_p
    return lib.flk_isa().decode()


def _usable(path: str) -> bool:
    if not os.path.exists(path):
        return False
    try:
        check_library(path)
    except BuildError:
        return False
    return True


def _compile(cxx: str, directory: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, *(os.path.join(SOURCE_DIR, name) for name in COMPILED), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        os.unlink(tmp)
        raise BuildError(f"compiler failed to run: {exc}") from exc
    if done.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"compiling {' '.join(COMPILED)} failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
    os.chmod(tmp, 0o700)
    return tmp


def build_cpu_library() -> str:
    """Path of the CPU kernel library, built (once per key, see module docstring) if needed.

    Raises BuildError on any failure: no compiler, compile error, insecure cache, load failure.
    """
    if os.environ.get(ENV_LIB):
        return check_library(os.environ[ENV_LIB])
    cxx = find_compiler()
    key = build_key(cxx)
    directory = os.path.join(cache_root(), key)
    _secure_dir(cache_root())
    _secure_dir(directory)
    final = os.path.join(directory, LIB_NAME)
    if _usable(final):
        return final
    lock_fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if not _usable(final):  # nobody built it while we waited (a damaged file is rebuilt)
            tmp = _compile(cxx, directory)
            try:
                check_library(tmp)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    return check_library(final)
