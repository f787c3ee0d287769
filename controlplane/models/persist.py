"""Saving and loading models safely: skops instead of pickle, behind a checked header.

A model file is one JSON header line, then the skops payload:

    {"format": "botwall-model", "schema": 1, "kind": "baseline", "version": "...",
     "feature_names": [...], "payload_bytes": N, "sha256": "...", ...}\\n
    <skops zip archive, N bytes>

Loading checks, in order and before any byte of the payload is deserialised:
the header parses, the schema version is one this code reads, the kind is
known (and the one asked for), the feature names are exactly the caller's,
the payload has its recorded length and SHA-256 (and HMAC-SHA256, when a key
is given). Only then does skops rebuild the objects, and it refuses any type
outside TRUSTED_TYPES (skops never unpickles, so a file cannot run code by
being opened). Every refusal is a ModelLoadError that says what was wrong.

The SHA-256 catches corruption and careless edits; anyone who can rewrite the
file can rewrite the digest too. Pass a key (from the agent's secrets) to
make the header an HMAC that only its holder can produce.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sklearn
import skops
import skops.io
from sklearn.utils.validation import check_is_fitted

from controlplane.models.baseline import BaselineAnomaly
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.models.journey import JourneyModel
from controlplane.models.supervised import SupervisedClassifier

FORMAT = "botwall-model"
SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_FILE_BYTES = 512 << 20

MODEL_KINDS: dict[str, type] = {
    cls.kind: cls
    for cls in (
        ConsistencyModel,
        BaselineAnomaly,
        JourneyModel,
        SupervisedClassifier,
        CampaignDetector,
    )
}

# Every type a model file may contain beyond what skops trusts by default
# (builtins, numpy arrays, public scikit-learn estimators). A test dumps every
# kind of model and checks nothing else is needed.
TRUSTED_TYPES = sorted(
    [f"{cls.__module__}.{cls.__qualname__}" for cls in MODEL_KINDS.values()]
    + [
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    ]
)


class ModelLoadError(ValueError):
    """A model file that is refused, with the reason in words."""


def _feature_names(model: Any) -> list[str]:
    # Models over sequences or identities (journey, consistency) have none.
    return [str(n) for n in getattr(model, "feature_names_in_", [])]


def _kind(model: Any) -> str:
    for kind, cls in MODEL_KINDS.items():
        if type(model) is cls:
            return kind
    raise TypeError(f"not a botwall model: {type(model).__name__}")


def _mac(key: bytes, header: dict[str, Any]) -> str:
    # Everything but the MAC itself, in a canonical encoding.
    fields = {k: v for k, v in header.items() if k != "hmac"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def save_model(
    model: Any, path: str | os.PathLike[str], *, key: bytes | None = None
) -> dict[str, Any]:
    """Write a fitted model atomically (a reader never sees half a file); returns
    the header."""
    kind = _kind(model)
    check_is_fitted(model)
    payload = skops.io.dumps(model)
    header: dict[str, Any] = {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "version": model.version_,
        "feature_names": _feature_names(model),
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "saved": datetime.now(UTC).isoformat(timespec="seconds"),
        "sklearn": sklearn.__version__,
        "skops": skops.__version__,
    }
    if key is not None:
        header["hmac"] = _mac(key, header)
    line = json.dumps(header, separators=(",", ":")).encode() + b"\n"
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(line + payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return header


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header alone, checked for form but not against any expectation."""
    header, _ = _split(Path(path))
    return header


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ModelLoadError(f"{path}: {size} bytes is larger than any model")
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    end = data.find(b"\n", 0, MAX_HEADER_BYTES)
    if end < 0:
        raise ModelLoadError(f"{path}: not a botwall model file (no header line)")
    try:
        header = json.loads(data[:end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a botwall model file (header: {exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a botwall model file (no {FORMAT!r} header)")
    return header, data[end + 1 :]


def load_model(
    path: str | os.PathLike[str],
    *,
    feature_names: Sequence[str],
    kind: str | None = None,
    key: bytes | None = None,
) -> Any:
    """Load a model saved by save_model, or raise ModelLoadError.

    feature_names: the columns the caller will feed, in order; pass () for
    models without features (journey, consistency). kind: refuse any other.
    key: require and check the header's HMAC.
    """
    where = Path(path)
    header, payload = _split(where)
    schema = header.get("schema")
    if schema != SCHEMA_VERSION:
        raise ModelLoadError(
            f"{where}: schema version {schema!r} is not supported (this botwall reads "
            f"{SCHEMA_VERSION}); retrain or convert the model"
        )
    found_kind = header.get("kind")
    if found_kind not in MODEL_KINDS:
        raise ModelLoadError(f"{where}: unknown model kind {found_kind!r}")
    if kind is not None and found_kind != kind:
        raise ModelLoadError(f"{where}: holds a {found_kind} model, expected {kind}")
    saved_names = header.get("feature_names")
    if saved_names != list(feature_names):
        raise ModelLoadError(
            f"{where}: feature names do not match: the model was trained on "
            f"{_diff(saved_names, list(feature_names))}"
        )
    if header.get("payload_bytes") != len(payload):
        raise ModelLoadError(
            f"{where}: payload is {len(payload)} bytes, header says "
            f"{header.get('payload_bytes')}: truncated or altered"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if not hmac.compare_digest(digest, str(header.get("sha256"))):
        raise ModelLoadError(f"{where}: checksum mismatch: the payload was altered or corrupted")
    if key is not None:
        mac = header.get("hmac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, header)):
            raise ModelLoadError(f"{where}: HMAC missing or wrong: not saved with this key")
    try:
        model = skops.io.loads(payload, trusted=TRUSTED_TYPES)
    except Exception as exc:  # anything skops refuses or fails on is a bad file
        raise ModelLoadError(f"{where}: payload refused: {type(exc).__name__}: {exc}") from exc
    if type(model) is not MODEL_KINDS[found_kind]:
        raise ModelLoadError(f"{where}: payload is a {type(model).__name__}, not a {found_kind}")
    if _feature_names(model) != saved_names or getattr(model, "version_", None) != header.get(
        "version"
    ):
        raise ModelLoadError(f"{where}: payload does not match its header")
    return model


def _diff(saved: object, expected: list[str]) -> str:
    if not isinstance(saved, list):
        return f"{saved!r}, expected {expected}"
    missing = [n for n in expected if n not in saved]
    extra = [n for n in saved if n not in expected]
    if not missing and not extra:
        return f"the same {len(saved)} features in another order ({saved})"
    parts = []
    if missing:
        parts.append(f"no {missing}")
    if extra:
        parts.append(f"{extra} the caller does not have")
    return ", ".join(parts)


__all__ = [
    "MODEL_KINDS",
    "SCHEMA_VERSION",
    "TRUSTED_TYPES",
    "ModelLoadError",
    "load_model",
    "read_header",
    "save_model",
]
