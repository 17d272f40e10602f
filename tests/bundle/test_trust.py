"""The device trust store: statements signed, verified, expired, revoked, persisted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import BundleError, generate_private_key, verify_bundle, write_bundle
from edgefleet.agent.bundle.keys import key_id
from edgefleet.agent.bundle.trust import TrustStore, sign_revoke, sign_trust
from edgefleet.agent.protocol import KeyTrust, ProtocolError, TrustStatement, decode, encode
from tests.bundle_helpers import two_stage_body, two_stage_files

T0 = 1_800_000_000.0
DAY = 86400.0


def kid(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())


def doc(*statements: TrustStatement) -> KeyTrust:
    return KeyTrust(statements=list(statements), published_ts=T0)


def rotation(old: Ed25519PrivateKey, new: Ed25519PrivateKey, at: float, overlap: float):
    return sign_trust(
        old, new.public_key(), not_before=at, old_key_expires_at=at + overlap, issued_ts=at
    )


@pytest.fixture
def a() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def b() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def c() -> Ed25519PrivateKey:
    return generate_private_key()


def store_of(tmp_path: Path, *keys: Ed25519PrivateKey) -> TrustStore:
    return TrustStore([k.public_key() for k in keys], tmp_path / "keys" / "trust.json")


def ids(store: TrustStore, now: float) -> list[str]:
    return store.trusted_ids(now)


def test_rotation_overlap_then_old_key_dropped(tmp_path: Path, a, b) -> None:
    store = store_of(tmp_path, a)
    out = store.apply(doc(rotation(a, b, T0, 7 * DAY)), now=T0)
    assert [s.key_id for s in out.accepted] == [kid(b)] and out.refused == []
    assert ids(store, T0 + 1) == sorted([kid(a), kid(b)])  # the overlap: both
    assert ids(store, T0 + 7 * DAY) == [kid(b)]  # after it only the new key
    # A second delivery of the same document (every reconnect) changes nothing.
    again = store.apply(doc(rotation(a, b, T0, 7 * DAY)), now=T0 + 5)
    assert again.accepted == [] and again.refused == []


def test_statement_round_trips_the_codec_and_the_signature_covers_every_field(a, b) -> None:
    s = rotation(a, b, T0, DAY)
    assert decode(KeyTrust, encode(doc(s))) == doc(s)
    for change in (
        {"old_key_expires_at": T0 + 100 * DAY},
        {"not_before": T0 - DAY},
        {"issued_ts": T0 + 1},
    ):
        forged = TrustStatement.model_validate({**s.model_dump(), **change})
        store = TrustStore([a.public_key()], None)
        out = store.apply(doc(forged), now=T0)
        assert out.accepted == []
        assert "signature does not verify under key" in out.refused[0][1]


def test_untrusted_signer_is_refused_and_changes_nothing(tmp_path: Path, a, b, c) -> None:
    store = store_of(tmp_path, a)
    out = store.apply(doc(rotation(c, b, T0, DAY)), now=T0)
    assert out.accepted == []
    assert out.refused[0][1] == (
        f"trust statement for key {kid(b)} signed by {kid(c)}: "
        "the signer is not a key this device knows"
    )
    assert ids(store, T0 + 2 * DAY) == [kid(a)]
    assert not (tmp_path / "keys" / "trust.json").exists()


def test_key_id_must_match_the_public_key(a, b, c) -> None:
    s = rotation(a, b, T0, DAY)
    # Re-signed with a lying key_id: the signature is right, the content is not.
    from edgefleet.agent.bundle.trust import _signed

    lying = TrustStatement.model_construct(**{**s.model_dump(), "key_id": kid(c)})
    forged = _signed(a, lying)
    out = TrustStore([a.public_key()], None).apply(doc(forged), now=T0)
    assert "key_id does not match public_key" in out.refused[0][1]


def test_expired_old_key_can_sign_nothing_more(a, b, c) -> None:
    store = TrustStore([a.public_key()], None)
    store.apply(doc(rotation(a, b, T0, DAY)), now=T0)
    late = sign_trust(
        a, c.public_key(), not_before=T0, old_key_expires_at=None, issued_ts=T0
    )  # backdated by the thief of an old key: the device judges by its own clock
    out = store.apply(doc(late), now=T0 + 2 * DAY)
    assert "the signer is not trusted at this time" in out.refused[0][1]
    assert ids(store, T0 + 2 * DAY) == [kid(b)]


def test_an_offline_device_catches_up_through_the_whole_chain(tmp_path: Path, a, b, c) -> None:
    chain = doc(rotation(a, b, T0, DAY), rotation(b, c, T0 + 10 * DAY, DAY))
    store = store_of(tmp_path, a)
    out = store.apply(chain, now=T0 + 30 * DAY)  # a month later
    assert len(out.accepted) == 2
    assert ids(store, T0 + 30 * DAY) == [kid(c)]
    # Restarted, it replays what it accepted (signatures only) to the same state.
    assert ids(store_of(tmp_path, a), T0 + 30 * DAY) == [kid(c)]


def test_revocation_rules(a, b, c) -> None:
    store = TrustStore([a.public_key()], None)
    store.apply(doc(rotation(a, b, T0, DAY)), now=T0)
    # The last lasting key (b: a expires) cannot be revoked: nothing would be left.
    out = store.apply(doc(sign_revoke(a, kid(b), issued_ts=T0 + 1)), now=T0 + 1)
    assert "would leave no key without an expiry; rotate to a new key first" in out.refused[0][1]
    # A key never signs its own revocation.
    with pytest.raises(ValueError, match="cannot sign a statement about itself"):
        sign_revoke(b, kid(b), issued_ts=T0)
    # Rotate b -> c, then b (stolen, say) is revoked by c during the overlap.
    store.apply(doc(rotation(b, c, T0 + 2, DAY)), now=T0 + 2)
    out = store.apply(doc(sign_revoke(c, kid(b), issued_ts=T0 + 3)), now=T0 + 3)
    assert [s.action for s in out.accepted] == ["revoke"]
    assert ids(store, T0 + 4) == sorted([kid(a), kid(c)])  # a's own overlap still runs
    # Permanent: b is never introduced again, whoever signs.
    back = sign_trust(c, b.public_key(), not_before=T0, old_key_expires_at=None, issued_ts=T0 + 5)
    out = store.apply(doc(back), now=T0 + 5)
    assert "the key is revoked (revocation is permanent)" in out.refused[0][1]
    # A revoked key signs nothing.
    d = generate_private_key()
    out = store.apply(doc(rotation(b, d, T0 + 6, DAY)), now=T0 + 6)
    assert "the signer is revoked" in out.refused[0][1]


def test_one_bad_statement_does_not_stop_the_good_ones(a, b, c) -> None:
    bad = rotation(c, b, T0, DAY)  # c is unknown
    good = rotation(a, b, T0, DAY)
    out = TrustStore([a.public_key()], None).apply(doc(bad, good), now=T0)
    assert [s.signer for s in out.accepted] == [kid(a)]
    assert [s.signer for s, _ in out.refused] == [kid(c)]


def test_not_before_in_the_future(a, b) -> None:
    store = TrustStore([a.public_key()], None)
    s = sign_trust(
        a, b.public_key(), not_before=T0 + DAY, old_key_expires_at=T0 + 2 * DAY, issued_ts=T0
    )
    store.apply(doc(s), now=T0)
    assert ids(store, T0 + 1) == [kid(a)]
    assert ids(store, T0 + DAY) == sorted([kid(a), kid(b)])


def test_a_corrupt_trust_file_falls_back_to_the_config_keys(tmp_path: Path, a, b) -> None:
    store = store_of(tmp_path, a)
    store.apply(doc(rotation(a, b, T0, DAY)), now=T0)
    path = tmp_path / "keys" / "trust.json"
    body = json.loads(path.read_bytes())
    assert body["statements"][0]["key_id"] == kid(b)
    path.write_bytes(b"{not json")
    assert ids(store_of(tmp_path, a), T0) == [kid(a)]
    # A statement someone edited in the file (signature broken) is not replayed.
    body["statements"][0]["old_key_expires_at"] = T0 + 1e6
    path.write_text(json.dumps(body))
    assert ids(store_of(tmp_path, a), T0 + 2 * DAY) == [kid(a)]


def test_statement_shape_is_checked_at_decode(a, b) -> None:
    s = rotation(a, b, T0, DAY).model_dump()
    s["public_key"] = None
    body = json.dumps({"v": 1, "statements": [s], "published_ts": T0}).encode()
    err = decode(KeyTrust, body)
    assert isinstance(err, ProtocolError)
    assert "a trust statement needs public_key and not_before" in err.message


def test_verify_bundle_follows_the_store(tmp_path: Path, a, b) -> None:
    bundle_b = tmp_path / "bundle-b"
    write_bundle(bundle_b, two_stage_body(), two_stage_files(), b)
    store = TrustStore([a.public_key()], None)
    with pytest.raises(BundleError):
        verify_bundle(bundle_b, store.trusted_keys(T0))
    store.apply(doc(rotation(a, b, T0, DAY)), now=T0)
    verify_bundle(bundle_b, store.trusted_keys(T0))
