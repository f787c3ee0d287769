"""Model files: skops behind a checked header; anything altered or foreign is refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io

from controlplane.models.campaign import CAMPAIGN_FEATURES, CampaignDetector
from controlplane.models.persist import (
    SCHEMA_VERSION,
    TRUSTED_TYPES,
    ModelLoadError,
    load_model,
    read_header,
    save_model,
)
from tests.synthetic_traffic import (
    CLIENT_FEATURES,
    JA4_REQUESTS,
    TCP_LINUX,
    UA_CHROME_WINDOWS,
    UA_GOOGLEBOT,
    Traffic,
    client_group,
    cluster_features,
    feature_matrix,
    trained,
)

NAMES = list(CLIENT_FEATURES)


def models() -> dict[str, tuple[Any, list[str]]]:
    t = trained()
    return {
        "consistency": (t.consistency, []),
        "baseline": (t.baseline, NAMES),
        "journey": (t.journey, []),
        "supervised": (t.supervised, NAMES),
        "campaign": (t.campaign, list(CAMPAIGN_FEATURES)),
    }


def predictions(kind: str, model: Any) -> Any:
    """What each kind of model says about fixed traffic, to compare after a load."""
    traffic = Traffic(61)
    people = traffic.humans(50)
    bots = [traffic.sms_pumper(), traffic.stealthy_scraper(), traffic.inventory_hoarder()]
    clients = people + bots
    if kind == "consistency":
        return [
            model.explain(user_agent=UA_CHROME_WINDOWS, ja4=JA4_REQUESTS, tcp=TCP_LINUX),
            model.explain(user_agent=UA_GOOGLEBOT, client="203.0.113.1"),
        ]
    if kind == "baseline":
        return model.score_samples(feature_matrix(clients), [client_group(c) for c in clients])
    if kind == "journey":
        return [model.explain(c.steps, paths=c.paths) for c in clients]
    if kind == "supervised":
        return model.predict_proba(feature_matrix(clients))
    stuffing = cluster_features(traffic.credential_stuffing(60), baseline_share=0.0)
    return model.explain(stuffing, ("ja4", "t13d"))


@pytest.mark.parametrize("kind", ["consistency", "baseline", "journey", "supervised", "campaign"])
def test_round_trip_gives_equal_predictions(kind: str, tmp_path: Path) -> None:
    model, names = models()[kind]
    path = tmp_path / f"{kind}.model"
    header = save_model(model, path)
    assert header["kind"] == kind and header["schema"] == SCHEMA_VERSION
    assert header["feature_names"] == names and header["version"] == model.version_
    assert read_header(path) == header
    loaded = load_model(path, feature_names=names, kind=kind)
    assert type(loaded) is type(model) and loaded.version_ == model.version_
    before, after = predictions(kind, model), predictions(kind, loaded)
    if isinstance(before, np.ndarray):
        assert np.array_equal(before, after)
    else:
        assert before == after


def test_every_model_needs_only_trusted_types() -> None:
    for kind, (model, _) in models().items():
        untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
        assert set(untrusted) <= set(TRUSTED_TYPES), (kind, untrusted)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "baseline.model"
    save_model(trained().baseline, path)
    return path


def test_a_flipped_payload_byte_is_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        load_model(saved, feature_names=NAMES)


def test_a_truncated_file_is_refused(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated or altered"):
        load_model(saved, feature_names=NAMES)


def test_other_feature_names_are_refused(saved: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no \['bytes_up'\]"):
        load_model(saved, feature_names=[*NAMES, "bytes_up"])
    with pytest.raises(ModelLoadError, match="another order"):
        load_model(saved, feature_names=list(reversed(NAMES)))


def _rewrite_header(path: Path, **changes: Any) -> None:
    data = path.read_bytes()
    end = data.index(b"\n")
    header = json.loads(data[:end]) | changes
    path.write_bytes(json.dumps(header).encode() + data[end:])


def test_an_unknown_schema_version_is_refused(saved: Path) -> None:
    _rewrite_header(saved, schema=SCHEMA_VERSION + 1)
    with pytest.raises(ModelLoadError, match="schema version 2 is not supported"):
        load_model(saved, feature_names=NAMES)


def test_an_unknown_or_unexpected_kind_is_refused(saved: Path) -> None:
    with pytest.raises(ModelLoadError, match="holds a baseline model, expected supervised"):
        load_model(saved, feature_names=NAMES, kind="supervised")
    _rewrite_header(saved, kind="oracle")
    with pytest.raises(ModelLoadError, match="unknown model kind 'oracle'"):
        load_model(saved, feature_names=NAMES)


def test_a_header_that_lies_about_the_payload_is_refused(tmp_path: Path) -> None:
    # A journey payload under a header claiming a campaign: each check passes
    # until the object itself is compared with what the header says.
    path = tmp_path / "x.model"
    save_model(trained().journey, path)
    _rewrite_header(path, kind="campaign")
    with pytest.raises(ModelLoadError, match="not a campaign"):
        load_model(path, feature_names=[])


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {_Exploit.marker}",))

    marker = ""


def test_a_pickle_exploit_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    payload = pickle.dumps(_Exploit())
    raw = tmp_path / "raw.model"
    raw.write_bytes(payload)
    with pytest.raises(ModelLoadError, match="not a botwall model file"):
        load_model(raw, feature_names=[])
    # The same pickle behind a header whose checksum is right for it.
    header = {
        "format": "botwall-model",
        "schema": SCHEMA_VERSION,
        "kind": "journey",
        "version": "journey-x",
        "feature_names": [],
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    wrapped = tmp_path / "wrapped.model"
    wrapped.write_bytes(json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(ModelLoadError, match="payload refused"):
        load_model(wrapped, feature_names=[])
    assert not marker.exists()


def test_an_untrusted_type_in_a_skops_payload_is_refused(tmp_path: Path) -> None:
    model = CampaignDetector().fit()
    model.smuggled_ = Fraction(1, 3)  # any type outside TRUSTED_TYPES
    path = tmp_path / "campaign.model"
    save_model(model, path)
    with pytest.raises(ModelLoadError, match=r"fractions\.Fraction"):
        load_model(path, feature_names=list(CAMPAIGN_FEATURES))


def test_hmac_key(tmp_path: Path) -> None:
    path = tmp_path / "signed.model"
    save_model(trained().campaign, path, key=b"k" * 32)
    names = list(CAMPAIGN_FEATURES)
    assert load_model(path, feature_names=names, key=b"k" * 32).version_
    with pytest.raises(ModelLoadError, match="HMAC"):
        load_model(path, feature_names=names, key=b"x" * 32)
    save_model(trained().campaign, path)  # unsigned
    with pytest.raises(ModelLoadError, match="HMAC missing"):
        load_model(path, feature_names=names, key=b"k" * 32)


def test_unreadable_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(tmp_path / "absent.model", feature_names=[])
    junk = tmp_path / "junk.model"
    junk.write_bytes(b'{"format": "something-else"}\nxyz')
    with pytest.raises(ModelLoadError, match="no 'botwall-model' header"):
        load_model(junk, feature_names=[])
    assert issubclass(ModelLoadError, ValueError)
