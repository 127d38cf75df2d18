"""The model artifact directory: files, manifest, checksums, atomic save, verified load.

Layout (see the contract): ``prefill.ubj`` (XGBoost UBJSON: the residual trees),
``decode_net.safetensors``, ``training_data.parquet`` and ``manifest.json``. The manifest
lists the SHA-256 of every other file and carries ``manifest_sha256``, a digest of its own
canonical JSON (without that field), so a flipped byte anywhere — data file or manifest —
is refused on load. Nothing here unpickles or executes anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from toolkit.atomic import atomic_directory
from toolkit.errors import LatkitError

FORMAT: Final[str] = "latkit-hybrid"
# 2: ReLU decode network on raw features, power-sum basis (version 1 artifacts: SiLU, log
# token counts, a saturating basis term; refused with a message to retrain).
# 3: prefill = physics baseline x residual trees (weights in the manifest), bounds calibrated
# by conformal prediction (factors in the manifest); no quantile booster. Version 2 artifacts
# are refused with a message to retrain.
# 4: decode per-pass time = a + c x KV length (prompt + k), the network sees the
# configuration only; version 3 artifacts (quadratic positional basis) are refused. Later
# version 4 artifacts add the decode's physics prior (a ``prior`` tensor in the decode file);
# one without it loads with the identity prior, which is the network alone it was saved as.
FORMAT_VERSION: Final[int] = 4
MANIFEST: Final[str] = "manifest.json"
PREFILL_FILE: Final[str] = "prefill.ubj"
DECODE_FILE: Final[str] = "decode_net.safetensors"
TRAINING_DATA_FILE: Final[str] = "training_data.parquet"
REQUIRED_FILES: Final[tuple[str, ...]] = (
    PREFILL_FILE,
    DECODE_FILE,
    TRAINING_DATA_FILE,
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_artifact(
    directory: str | Path,
    write_files: Callable[[Path], None],
    manifest: dict[str, Any],
) -> None:
    """Write an artifact atomically: ``write_files(tmp)`` fills a temp dir, then we checksum,
    add the manifest and swap the directory into place (an old model survives a crash)."""
    with atomic_directory(directory) as tmp:
        write_files(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            raise RuntimeError(f"artifact writer did not produce {', '.join(missing)}")
        full = dict(manifest)
        full["format"] = FORMAT
        full["format_version"] = FORMAT_VERSION
        full["files"] = {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in files
        }
        full["manifest_sha256"] = _manifest_digest(full)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, allow_nan=False) + "\n")


def read_verified_manifest(directory: str | Path) -> dict[str, Any]:
    """Manifest of a verified artifact, or LatkitError naming the offending file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LatkitError(f"{directory}: model directory not found")
    path = directory / MANIFEST
    if not path.is_file():
        raise LatkitError(f"{path}: missing; {directory} is not a latkit model directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatkitError(f"{path}: corrupted or truncated manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise LatkitError(f"{path}: not a latkit manifest (not a JSON object)")
    if manifest.get("format") != FORMAT:
        raise LatkitError(
            f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r} "
            "(not a latkit model)"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LatkitError(
            f"{path}: format_version {version!r} is not supported (this latkit reads "
            f"{FORMAT_VERSION}); retrain or use a matching latkit"
        )
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise LatkitError(f"{path}: manifest checksum mismatch (corrupted or edited)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise LatkitError(f"{path}: manifest lists no files")
    for name in REQUIRED_FILES:
        if name not in files:
            raise LatkitError(f"{path}: manifest does not list {name}")
    for name, entry in files.items():
        file_path = directory / name
        if Path(name).name != name:
            raise LatkitError(f"{path}: bad file name {name!r} in manifest")
        if not file_path.is_file():
            raise LatkitError(f"{file_path}: missing from the model directory")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if sha256_file(file_path) != expected:
            size = file_path.stat().st_size
            hint = (
                "truncated"
                if isinstance(entry, dict) and size < entry.get("bytes", 0)
                else "corrupted"
            )
            raise LatkitError(f"{file_path}: SHA-256 mismatch ({hint} or modified)")
    return manifest
