"""Build what the stack deploys: two Lambda zips and the Spark job files, under ``build/``.

``python -m infra.package`` writes:

* ``capture.zip``: ``encore/``, the capture and the Lambda logging from ``lambdas/``, and
  Linux wheels of the capture's third-party packages (boto3 comes with the Lambda runtime);
* ``presign.zip``: ``encore/`` and the presign handler from ``lambdas/``;
* ``spark/pyfiles.zip`` (``encore/``, ``spark_streaming/``, ``batch/``, for ``--py-files``)
  and the two entry scripts ``spark/popularity.py`` and ``spark/recommend.py``.

The wheels are downloaded once into ``build/wheels/`` for the Lambda platform
(``manylinux2014_x86_64``, CPython 3.11) at the versions pinned in ``requirements.lock``.
Zips are deterministic (sorted entries, fixed timestamps), so the same sources give the
same bytes: ``infra.deploy`` names uploads by their content hash, and CloudFormation
replaces a function's code only when it changed. A second run rebuilds nothing whose
inputs did not change and downloads nothing already there.

Limitations: the wheels are for x86_64 only, which is what the template's functions run
on. The Spark jobs' own dependencies (numpy, pyarrow, pandas, boto3, a Python 3.11) are
not bundled: they come with the Spark image (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from encore.output import output_logger

logger = logging.getLogger(__name__)
output = output_logger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = ROOT / "build"

LAMBDA_PLATFORM = "manylinux2014_x86_64"
LAMBDA_PYTHON = "3.11"
#: Lambda refuses a function whose code unzips to more than 250 MB.
LAMBDA_UNZIPPED_LIMIT = 262_144_000
#: The earliest time a zip entry can carry; any fixed time makes the bytes repeatable.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class PackagingError(RuntimeError):
    """A bundle cannot be built; the message says which and why."""


@dataclass(frozen=True)
class LambdaBundle:
    name: str
    #: Files and folders relative to the project root, kept at the same path in the zip.
    sources: tuple[str, ...]
    #: Distributions pinned in requirements.lock, added as Linux wheels.
    wheels: tuple[str, ...] = ()


LAMBDA_BUNDLES = (
    LambdaBundle(
        "capture",
        ("encore", "lambdas/__init__.py", "lambdas/json_logging.py", "lambdas/capture"),
        # six: aws-kinesis-agg imports it without declaring it.
        ("psycopg2-binary", "aws-kinesis-agg", "protobuf", "six"),
    ),
    LambdaBundle(
        "presign", ("encore", "lambdas/__init__.py", "lambdas/json_logging.py", "lambdas/presign")
    ),
)
SPARK_PACKAGES = ("encore", "spark_streaming", "batch")
#: Entry script name in the bundle -> its source.
SPARK_ENTRY_POINTS = {
    "popularity.py": "spark_streaming/popularity.py",
    "recommend.py": "batch/recommend.py",
}


@dataclass(frozen=True)
class Artifact:
    """Built files of one bundle and a hash of their contents."""

    name: str
    paths: tuple[Path, ...]
    sha256: str
    rebuilt: bool

    @property
    def digest(self) -> str:
        """A short content hash for object keys."""
        return self.sha256[:16]


def build(
    build_dir: Path = DEFAULT_BUILD_DIR, *, wheel_dir: Path | None = None, root: Path = ROOT
) -> dict[str, Artifact]:
    """Build every bundle into ``build_dir``; return them by name (capture, presign, spark)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    wheel_dir = wheel_dir or build_dir / "wheels"
    pins = read_pins(root / "requirements.lock")

    artifacts: dict[str, Artifact] = {}
    for bundle in LAMBDA_BUNDLES:
        wheels = ensure_wheels(bundle.wheels, pins, wheel_dir)
        artifacts[bundle.name] = _build_lambda(bundle, wheels, build_dir, root)
    artifacts["spark"] = _build_spark(build_dir / "spark", root)
    return artifacts


def read_pins(lock: Path) -> dict[str, str]:
    """``requirements.lock`` as normalized distribution name -> exact version."""
    pins = {}
    for number, line in enumerate(lock.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise PackagingError(f"{lock}:{number}: {line!r} is not pinned with ==")
        pins[_normalize(name)] = version.strip()
    return pins


def ensure_wheels(names: Iterable[str], pins: Mapping[str, str], wheel_dir: Path) -> list[Path]:
    """Linux wheels of ``names`` at their pinned versions; downloads those not in ``wheel_dir``."""
    wanted: dict[str, str] = {}
    for name in names:
        try:
            wanted[_normalize(name)] = pins[_normalize(name)]
        except KeyError:
            raise PackagingError(f"{name!r} is not pinned in requirements.lock") from None
    if not wanted:
        return []

    found = _wheels_in(wheel_dir, wanted)
    missing = [f"{name}=={version}" for name, version in wanted.items() if name not in found]
    if missing:
        logger.info("downloading %d wheel(s) for %s: %s", len(missing), LAMBDA_PLATFORM, missing)
        _pip_download(missing, wheel_dir)
        found = _wheels_in(wheel_dir, wanted)
    still_missing = sorted(set(wanted) - set(found))
    if still_missing:
        raise PackagingError(f"pip left no wheel for {still_missing} in {wheel_dir}")
    return [found[name] for name in sorted(found)]


def _wheels_in(wheel_dir: Path, wanted: Mapping[str, str]) -> dict[str, Path]:
    found = {}
    for wheel in wheel_dir.glob("*.whl"):
        # Wheel file names: {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl
        distribution, version = wheel.name.split("-")[:2]
        name = _normalize(distribution)
        if wanted.get(name) == version:
            found[name] = wheel
    return found


def _pip_download(requirements: Sequence[str], wheel_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--platform",
        LAMBDA_PLATFORM,
        "--python-version",
        LAMBDA_PYTHON,
        "--implementation",
        "cp",
        "--only-binary=:all:",
        "--no-deps",
        "--dest",
        str(wheel_dir),
        *requirements,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-3:]
        raise PackagingError(f"pip download failed for {list(requirements)}: {' | '.join(detail)}")


def _build_lambda(
    bundle: LambdaBundle, wheels: Sequence[Path], build_dir: Path, root: Path
) -> Artifact:
    target = build_dir / f"{bundle.name}.zip"
    sources = list(_source_files(root, bundle.sources))
    inputs = [(path.relative_to(root).as_posix(), path) for path in sources]
    fingerprint = _fingerprint(inputs + [(wheel.name, wheel) for wheel in wheels])
    if _unchanged(target, fingerprint):
        return _artifact(bundle.name, (target,), rebuilt=False)

    entries = [(path.relative_to(root).as_posix(), path.read_bytes(), False) for path in sources]
    for wheel in wheels:
        entries.extend(_wheel_entries(wheel))
    unzipped = sum(len(payload) for _, payload, _ in entries)
    if unzipped > LAMBDA_UNZIPPED_LIMIT:
        raise PackagingError(
            f"{target.name} would unzip to {unzipped:,} bytes; "
            f"Lambda takes at most {LAMBDA_UNZIPPED_LIMIT:,}"
        )
    _write_zip(target, entries)
    _remember(target, fingerprint)
    logger.info("built %s: %d files, %s unzipped", target.name, len(entries), _size(unzipped))
    return _artifact(bundle.name, (target,), rebuilt=True)


def _build_spark(spark_dir: Path, root: Path) -> Artifact:
    spark_dir.mkdir(parents=True, exist_ok=True)
    pyfiles = spark_dir / "pyfiles.zip"
    scripts = {spark_dir / name: root / source for name, source in SPARK_ENTRY_POINTS.items()}
    outputs = (pyfiles, *scripts)

    sources = list(_source_files(root, SPARK_PACKAGES))
    fingerprint = _fingerprint([(path.relative_to(root).as_posix(), path) for path in sources])
    if all(path.exists() for path in scripts) and _unchanged(pyfiles, fingerprint):
        return _artifact("spark", outputs, rebuilt=False)

    entries = [(path.relative_to(root).as_posix(), path.read_bytes(), False) for path in sources]
    _write_zip(pyfiles, entries)
    for script, source in scripts.items():
        script.write_bytes(source.read_bytes())
    _remember(pyfiles, fingerprint)
    logger.info(
        "built spark/: pyfiles.zip (%d files) and %d entry scripts", len(entries), len(scripts)
    )
    return _artifact("spark", outputs, rebuilt=True)


def _source_files(root: Path, sources: Iterable[str]) -> Iterator[Path]:
    for source in sources:
        path = root / source
        if path.is_file():
            yield path
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                    yield file
        else:
            raise PackagingError(f"bundle source {source!r} does not exist under {root}")


def _wheel_entries(wheel: Path) -> Iterator[tuple[str, bytes, bool]]:
    """A wheel's files at the paths an installer would give them under site-packages."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            name = info.filename
            top, _, rest = name.partition("/")
            if top.endswith(".data"):
                scheme, _, rest = rest.partition("/")
                # Scripts and headers are of no use inside a function.
                if scheme not in {"purelib", "platlib"}:
                    continue
                name = rest
            executable = bool((info.external_attr >> 16) & 0o111)
            yield name, archive.read(info), executable


def _write_zip(target: Path, entries: Iterable[tuple[str, bytes, bool]]) -> None:
    partial = target.with_name(target.name + ".partial")
    seen: set[str] = set()
    with zipfile.ZipFile(partial, "w") as archive:
        for name, payload, executable in sorted(entries, key=lambda entry: entry[0]):
            if name in seen:
                raise PackagingError(f"{name!r} would be written twice into {target.name}")
            seen.add(name)
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100755 if executable else 0o100644) << 16
            archive.writestr(info, payload, compresslevel=9)
    partial.replace(target)


def _fingerprint(inputs: Iterable[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in sorted(inputs):
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _unchanged(target: Path, fingerprint: str) -> bool:
    stamp = target.with_name(target.name + ".inputs")
    return target.exists() and stamp.exists() and stamp.read_text() == fingerprint


def _remember(target: Path, fingerprint: str) -> None:
    target.with_name(target.name + ".inputs").write_text(fingerprint)


def _artifact(name: str, paths: tuple[Path, ...], *, rebuilt: bool) -> Artifact:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return Artifact(name, paths, digest.hexdigest(), rebuilt)


def _normalize(name: str) -> str:
    """PEP 503 name normalization: ``aws_kinesis_agg`` and ``aws-kinesis-agg`` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _size(count: int) -> str:
    return f"{count / 1024 / 1024:.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Lambda zips and the Spark job files.")
    parser.add_argument(
        "--build-dir", type=Path, default=DEFAULT_BUILD_DIR, help="default: build/ in the checkout"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        artifacts = build(args.build_dir)
    except PackagingError as exc:
        output.error("packaging failed: %s", exc)
        return 2
    summary = {
        name: {
            "files": [str(path) for path in artifact.paths],
            "sha256": artifact.sha256,
            "rebuilt": artifact.rebuilt,
        }
        for name, artifact in artifacts.items()
    }
    output.info("%s", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
