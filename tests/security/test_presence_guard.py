"""The presence guard and seals as pure functions (no broker): who is believed, and why not."""

from __future__ import annotations

import pytest

from swarm_proto.presence import (
    MAX_EPOCH,
    Assign,
    LayerRange,
    Lease,
    NodeLoad,
    NodeState,
    NodeStatus,
    PayloadError,
    Topics,
    decode_assign,
    encode,
)
from swarm_proto.trust import (
    Identity,
    PresenceGuard,
    Sealer,
    decode_sealed,
    membership_proof,
    open_sealed,
    parse_key,
    read_allowed_keys,
)

T = Topics("lab")
TOKEN = "tok"


def member(token: str = TOKEN) -> Sealer:
    identity = Identity.generate()
    return Sealer(identity, membership_proof(token, "lab", identity.public))


def check(guard: PresenceGuard, topic: str, data: bytes) -> bool:
    kind, node_id, payload, seal = decode_sealed(T, topic, data)
    return guard.check(kind, node_id, payload, seal)


def status(node_id: str, state: NodeState = NodeState.READY) -> bytes:
    return encode(NodeStatus(node_id, f"{node_id}:1", "m", LayerRange(0, 4), state=state))


def test_a_member_is_admitted_and_owns_its_id() -> None:
    guard = PresenceGuard("lab", token=TOKEN)
    a, mallory = member(), member("wrong token")
    assert check(guard, T.status("a"), a.seal(T.status("a"), status("a")))
    assert check(guard, T.load("a"), a.seal(T.load("a"), encode(NodeLoad())))
    assert not check(guard, T.status("evil"), mallory.seal(T.status("evil"), status("evil")))  # no membership
    insider = member()  # knows the token, but a's id is taken by a's key
    assert not check(guard, T.status("a"), insider.seal(T.status("a"), status("a", NodeState.OFFLINE)))
    assert not check(guard, T.status("a"), status("a"))  # unsigned
    assert not check(guard, T.status("a"), b"")  # MQTT's "delete retained"
    assert not check(guard, T.load("ghost"), insider.seal(T.load("ghost"), encode(NodeLoad())))  # load before status
    assert guard.dropped == {"not admitted": 1, "key mismatch": 1, "unsigned": 1, "empty": 1, "unknown node": 1}


def test_replays_and_old_wills_are_refused_the_current_will_counts_once() -> None:
    guard = PresenceGuard("lab", token=TOKEN)
    a = member()
    will = a.seal(T.status("a"), status("a", NodeState.OFFLINE), will=True)  # sealed at connect
    ready = a.seal(T.status("a"), status("a"))
    assert check(guard, T.status("a"), ready)
    assert not check(guard, T.status("a"), ready)  # the same message again
    newer = a.seal(T.status("a"), status("a"))
    assert check(guard, T.status("a"), newer)
    older = a.seal(T.status("a"), status("a"))
    assert check(guard, T.status("a"), a.seal(T.status("a"), status("a")))
    assert not check(guard, T.status("a"), older)  # reordered or replayed: dropped
    assert check(guard, T.status("a"), will)  # the broker fires the Will long after it was sealed
    assert not check(guard, T.status("a"), will)  # but only once
    a.new_connection()
    assert check(guard, T.status("a"), a.seal(T.status("a"), status("a")))
    assert not check(guard, T.status("a"), will)  # an old connection's Will cannot take the node down


def test_seals_bind_the_topic_and_the_bytes() -> None:
    a = member()
    sealed = a.seal(T.status("a"), status("a"))
    with pytest.raises(PayloadError, match="another topic"):
        open_sealed(T.status("b"), sealed)
    for where in (-10, len(sealed) // 2):  # in the signature, in the signed bytes
        tampered = bytearray(sealed)
        tampered[where] ^= 1
        with pytest.raises(PayloadError):
            decode_sealed(T, T.status("a"), bytes(tampered))


def test_assignments_count_only_from_the_pinned_coordinator() -> None:
    coordinator, mallory = member(), member()
    node_guard = PresenceGuard("lab", coordinator_key=coordinator.identity.public)
    forged = mallory.seal(T.assign("a"), encode(Assign("a", "m", LayerRange(0, 30), 5)))
    assert not check(node_guard, T.assign("a"), forged)
    assert check(node_guard, T.assign("a"), coordinator.seal(T.assign("a"), encode(Assign("a", "m", None, 6))))
    with pytest.raises(PayloadError, match="epoch"):  # the poisoned epoch does not even decode
        decode_assign("a", encode(Assign("a", "m", None, 0)).replace(b"\xa5epoch\x00", b"\xa5epoch\xcf" + b"\xff" * 8))
    with pytest.raises(PayloadError):
        Assign("a", "m", None, MAX_EPOCH + 1)


def test_leases_count_only_from_the_shared_coordinator_key_and_empty_frees_them() -> None:
    coordinator, insider = member(), member()
    standby = Sealer(coordinator.identity, coordinator.proof)  # a standby with the same key file
    guard = PresenceGuard("lab", token=TOKEN, coordinator_key=coordinator.identity.public)
    lease = encode(Lease("coord-a", "a:7600", 3))
    assert check(guard, T.lease, coordinator.seal(T.lease, lease))
    assert check(guard, T.lease, standby.seal(T.lease, encode(Lease("coord-b", "b:7600", 4))))
    assert check(guard, T.lease, coordinator.seal(T.lease, lease))  # claimants race: lease.py orders by epoch
    assert check(guard, T.lease, b"")  # the holder's Will: the lease is free
    assert not check(guard, T.lease, insider.seal(T.lease, lease))  # a member, but not the coordinator
    assert not check(guard, T.lease, lease)  # unsigned
    assert guard.dropped == {"not the coordinator": 1, "unsigned": 1}
    # A node after a takeover: the standby seals assignments with the key it pinned.
    node = PresenceGuard("lab", coordinator_key=coordinator.identity.public)
    assign = encode(Assign("a", "m", LayerRange(0, 4), 1))
    assert check(node, T.assign("a"), coordinator.seal(T.assign("a"), assign))
    assert check(node, T.assign("a"), standby.seal(T.assign("a"), encode(Assign("a", "m", LayerRange(0, 2), 2))))


def test_open_swarm_pins_ids_and_bounds_how_many() -> None:
    guard = PresenceGuard("lab", max_nodes=3)  # no token, no allow-list: anyone may join
    for i in range(5):
        s = member("")
        check(guard, T.status(f"n{i}"), s.seal(T.status(f"n{i}"), status(f"n{i}")))
    assert len(guard.node_keys) == 3 and guard.dropped["too many nodes"] == 2


def test_allow_list(tmp_path) -> None:  # type: ignore[no-untyped-def]
    listed, other = member(""), member("")
    path = tmp_path / "keys"
    path.write_text(f"# operators' nodes\n{listed.identity.public_hex}  # a\n")
    guard = PresenceGuard("lab", allowed_keys=read_allowed_keys(str(path)))
    assert check(guard, T.status("a"), listed.seal(T.status("a"), status("a")))
    assert not check(guard, T.status("b"), other.seal(T.status("b"), status("b")))
    with pytest.raises(PayloadError):
        parse_key("abc")


def test_keys_persist(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state" / "node-a.key"
    first = Identity.load_or_create(path)
    assert Identity.load_or_create(path).public == first.public
    assert path.stat().st_mode & 0o777 == 0o600
