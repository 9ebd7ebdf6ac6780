"""The hospital's side of SecAgg+: its update leaves only masked, so the coordinator sees sums.

Five ``train.secagg`` messages per round (see ``privacy.secagg``):

1. ``setup``: make two X25519 key pairs (one to encrypt shares, one to agree masks) and a
   self-mask seed; send the public keys signed with the hospital's enrolled node key (with the
   noise share it will add), a commitment to the seed, and the averaging weight.
2. ``share``: keep the neighbours whose keys are signed by a distinct hospital on the
   consortium roster (``privacy.secagg.identity``); refuse the round if fewer remain than this
   hospital's own minimum, unless its run policy allows plain rounds (then the ledger charges
   the update as released alone). Split the masking private key and the seed into Shamir shares
   with a threshold of at least a strict majority of the kept group, one per verified
   neighbour (and one kept), each encrypted for its neighbour; the coordinator relays them.
3. ``mask``: receive the global adapter and the neighbours' encrypted shares; train as in a
   plain round (site policy, DP, ledger - charged from what this hospital checked); send the
   weighted update ``new - global`` quantised and masked with the self-mask and one pairwise
   mask per verified neighbour, plus the plain metrics.
4. ``check``: sign the survivor set the coordinator announces (it must include this hospital,
   which did send its input; a second, different set is never signed).
5. ``unmask``: only for the set it signed, and only when at least its threshold of its verified
   group signed that same set (so the coordinator cannot show different hospitals different
   sets): for each neighbour that dropped out send its masking-key share, for each that stayed
   its seed share - never both for one hospital, which would unmask its update, and nothing
   unless the survivors it holds verified shares for (and itself) reach its minimum.

Nothing the coordinator sends sets a floor: the minimum group, the threshold and the peers that
count are this hospital's own. Secrets live in ``context.state`` for the round only and are
deleted after ``unmask``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client.run_policy import RUN_POLICY_KEY, load_run_policy
from models.finite import NonFiniteError, check_finite_number, check_finite_tensors
from privacy.config import dp_config_from_record
from privacy.secagg import SecAggError, crypto
from privacy.secagg.encoding import flatten, quantize
from privacy.secagg.identity import (
    IdentityLoader,
    SecAggIdentity,
    SetupKeys,
    identity_from_node_config,
    sign_setup,
    sign_survivors,
    verify_setup,
    verify_survivors,
)
from privacy.secagg.wire import MASKED, RECORD, VECTOR, ids_in, ids_out

logger = logging.getLogger(__name__)

STATE_KEY = "secagg-state"
"""Where the round's secrets are kept in ``context.state`` between stages."""
PROTOCOL_ERROR = 422
"""Flower error code of a stage the hospital refuses (malformed or unsafe request)."""
MIN_GROUP = 3
"""The fewest distinct enrolled hospitals (this one included) whose sum a hospital helps
unmask, whatever its run policy says: with two, each learns the other's update."""

TrainHandler = Callable[[Message, Context], Message]
"""A plain training round: the ``train`` message in, the reply (adapter + metrics) out."""
WeightOf = Callable[[Message, Context, str], float]
"""The hospital's averaging weight for the round: ``(setup message, context, weight key)``."""


def handle_secagg(msg: Message, context: Context, train: TrainHandler, weight_of: WeightOf,
                  identity_of: IdentityLoader = identity_from_node_config) -> Message:
    """Answer one stage of the protocol; a refused or broken stage is an error reply.

    ``identity_of`` gives the hospital's node key and the CA-checked roster (default: the
    node config's ``node-key``, ``secagg-roster`` and ``ca-cert``).
    """
    try:
        request = msg.content.config_records[RECORD]
        stage = str(request["stage"])
        if stage == "setup":
            return _reply(msg, _setup(msg, request, context, weight_of, identity_of(context)))
        if stage == "share":
            return _reply(msg, _share(request, context, identity_of(context)))
        if stage == "mask":
            return _mask(msg, request, context, train)
        if stage == "check":
            return _reply(msg, _check(request, context, identity_of(context)))
        if stage == "unmask":
            return _reply(msg, _unmask(request, context, identity_of(context)))
        raise SecAggError(f"unknown secure-aggregation stage '{stage}'")
    except NonFiniteError:
        raise  # the egress point answers it with its category (client.audit.failure_category)
    except (SecAggError, KeyError, ValueError, TypeError) as err:
        logger.warning("secure aggregation: refused a stage: %s", err)
        return Message(Error(code=PROTOCOL_ERROR, reason=f"secure aggregation: {err}"),
                       reply_to=msg)


def _reply(msg: Message, record: ConfigRecord) -> Message:
    return Message(RecordDict({RECORD: record}), reply_to=msg)


def _state(context: Context, server_round: int) -> ConfigRecord:
    if STATE_KEY not in context.state.config_records:
        raise SecAggError("no key setup for this round (stage out of order)")
    state = context.state.config_records[STATE_KEY]
    if int(state["round"]) != server_round:
        raise SecAggError(f"keys are for round {state['round']}, not {server_round}")
    return state


def own_rules(context: Context) -> tuple[int, bool]:
    """``(minimum group, plain rounds allowed)`` from the hospital's run policy: the group is at
    least :data:`MIN_GROUP` and the policy's ``min_hospitals``."""
    path = context.node_config.get(RUN_POLICY_KEY)
    if not path:
        return MIN_GROUP, True
    policy = load_run_policy(Path(str(path)))
    return max(MIN_GROUP, policy.min_hospitals), not policy.require_secure_aggregation


def noise_hospitals(msg: Message, identity: SecAggIdentity) -> tuple[int, float]:
    """``(n, z / sqrt(n))``: the hospitals the round's client-level DP noise is split over,
    capped at the roster's size (the coordinator cannot make a hospital add less noise by
    claiming more hospitals than are enrolled), and the noise share this hospital adds (std
    over the clip norm; 0 without client-level DP)."""
    config = msg.content.config_records.get("config")
    dp = dp_config_from_record(config) if config is not None else None
    if dp is None or not dp.update_dp:
        return 0, 0.0
    enrolled = len(identity.roster.keys)
    hospitals = min(dp.update_hospitals or enrolled, enrolled)
    if hospitals < 1:
        raise SecAggError("client-level DP over fewer than one hospital")
    return hospitals, dp.update_noise_multiplier / math.sqrt(hospitals)


def _setup(msg: Message, request: ConfigRecord, context: Context, weight_of: WeightOf,
           identity: SecAggIdentity) -> ConfigRecord:
    c_private, c_public = crypto.generate_keypair()
    s_private, s_public = crypto.generate_keypair()
    seed = crypto.random_seed()
    weight = float(weight_of(msg, context, str(request["weight-key"])))
    hospitals, noise_share = noise_hospitals(msg, identity)
    server_round, node = int(request["round"]), int(str(request["node"]))
    signature = sign_setup(identity.key, SetupKeys(context.run_id, server_round, node, c_public,
                                                   s_public, noise_share))
    context.state[STATE_KEY] = ConfigRecord({
        "round": server_round, "node": str(node), "name": identity.name,
        "threshold": int(request["threshold"]),
        "neighbours": list(request["neighbours"]),
        "noise-hospitals": hospitals, "noise-share": noise_share,
        "c-private": c_private, "s-private": s_private, "seed": seed, "weight": weight,
        "peers": [], "peer-names": [], "peer-c": [], "peer-s": [], "survivors": [],
        "held-from": [], "held-seed": [], "held-key": [], "own-seed-share": b"",
        "own-key-share": b"",
    })
    return ConfigRecord({"c-public": c_public, "s-public": s_public,
                         "seed-commitment": crypto.commitment(seed), "weight": weight,
                         "hospital": identity.name, "signature": signature,
                         "noise-share": noise_share})


def verified_peers(request: ConfigRecord, state: ConfigRecord, identity: SecAggIdentity,
                   run_id: int) -> tuple[list[int], dict[int, str]]:
    """The peers in a ``share`` request whose keys are signed by a distinct enrolled hospital
    other than this one, and who add at least this hospital's noise share (in request order),
    and their enrolled names.

    A peer signed by a key off the roster, unsigned, or whose enrolled name appears under two
    node ids (one key, two nodes: the coordinator cannot tell which is real) does not count.
    """
    peers = ids_in(request["peers"])
    columns = [list(request[k]) for k in ("c-public", "s-public", "hospitals", "signatures",
                                          "noise-shares")]
    if any(len(c) != len(peers) for c in columns):
        raise SecAggError("peer list, public keys, names and signatures differ in length")
    server_round, own_share = int(state["round"]), float(state["noise-share"])
    signed: dict[int, str] = {}
    for peer, c_pub, s_pub, name, signature, share in zip(peers, *columns, strict=True):
        keys = SetupKeys(run_id, server_round, peer, bytes(c_pub), bytes(s_pub), float(share))
        if str(name) == identity.name or not verify_setup(identity.roster, str(name), keys,
                                                         bytes(signature)):
            logger.warning("secure aggregation: node %d's keys are not signed by an enrolled "
                           "hospital; not counted", peer)
            continue
        if float(share) < own_share * (1 - 1e-9):
            logger.warning("secure aggregation: node %d (%s) adds less noise (%g) than this "
                           "hospital (%g); not counted", peer, name, float(share), own_share)
            continue
        signed[peer] = str(name)
    seen = Counter(signed.values())
    for peer, name in list(signed.items()):
        if seen[name] > 1:
            logger.warning("secure aggregation: hospital %s appears as node %d and another; "
                           "neither counted", name, peer)
            del signed[peer]
    return [p for p in peers if p in signed], signed


def _share(request: ConfigRecord, context: Context, identity: SecAggIdentity) -> ConfigRecord:
    state = _state(context, int(request["round"]))
    me = int(state["node"])
    peers = ids_in(request["peers"])
    if not set(peers) <= set(ids_in(state["neighbours"])) or me in peers:
        raise SecAggError("the coordinator sent keys of hospitals that are not my neighbours")
    verified, names = verified_peers(request, state, identity, context.run_id)
    members = sorted([me, *verified])
    minimum, plain_allowed = own_rules(context)
    if len(members) < minimum and not plain_allowed:
        raise SecAggError(f"only {len(members) - 1} neighbours are verified enrolled hospitals; "
                          f"this hospital aggregates with at least {minimum - 1}")
    if len(verified) < 1:
        raise SecAggError("no neighbour is a verified enrolled hospital")
    # At least a strict majority of the group: then the coordinator can never collect both a
    # hospital's seed and its masking key, whatever it tells each member.
    threshold = max(int(state["threshold"]), len(members) // 2 + 1)
    if threshold > len(members):
        raise SecAggError(f"{len(verified)} verified neighbours, the threshold needs "
                          f"{threshold - 1}")
    # Below its minimum the hospital may still take part (its policy allows plain rounds), but
    # its ledger then charges the update as released alone.
    state["charge-sum"] = minimum if len(members) >= minimum else 1
    state["min-sum"] = minimum
    state["threshold"] = threshold
    seed_shares = crypto.split_secret(bytes(state["seed"]), threshold, len(members))
    key_shares = crypto.split_secret(bytes(state["s-private"]), threshold, len(members))
    server_round = int(state["round"])
    c_keys, s_keys = list(request["c-public"]), list(request["s-public"])
    destinations, ciphertexts = [], []
    for index, node in enumerate(members):
        if node == me:
            state["own-seed-share"], state["own-key-share"] = seed_shares[index], key_shares[index]
            continue
        peer_c = bytes(c_keys[peers.index(node)])
        key = crypto.agree(bytes(state["c-private"]), peer_c, crypto.SHARE_PURPOSE)
        plaintext = crypto.pack_shares(me, node, seed_shares[index], key_shares[index])
        ciphertexts.append(crypto.encrypt(key, plaintext,
                                          crypto.share_aad(server_round, me, node)))
        destinations.append(node)
    state["peers"] = ids_out(verified)
    state["peer-names"] = [names[p] for p in verified]
    state["peer-c"] = [bytes(c_keys[peers.index(p)]) for p in verified]
    state["peer-s"] = [bytes(s_keys[peers.index(p)]) for p in verified]
    return ConfigRecord({"destinations": ids_out(destinations), "ciphertexts": ciphertexts,
                         "threshold": threshold})


def _mask(msg: Message, request: ConfigRecord, context: Context, train: TrainHandler) -> Message:
    """The masked-input stage: keep the neighbours' shares, train, then send the update
    quantised and masked (with this hospital's own mask and the pairwise masks of every
    neighbour whose shares arrived intact)."""
    state = _state(context, int(request["round"]))
    if "charge-sum" not in state:
        raise SecAggError("no shares were made this round (the share stage was refused)")
    held_from, bad = _keep_shares(request, state)
    reply = train(_train_message(msg, state), context)
    if reply.has_error():
        return Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=msg)
    codes, clipped = _quantized_update(msg, request, state, reply)
    masked = _masked(codes, request, state, held_from)
    content = RecordDict({
        MASKED: ArrayRecord({VECTOR: Array(masked.astype(np.uint32))}),
        RECORD: ConfigRecord({"masked-with": ids_out(held_from),
                              "bad-shares-from": ids_out(bad), "clipped": clipped}),
    })
    state["masked"] = True
    for name, record in reply.content.metric_records.items():
        content[name] = record
    if "site" in reply.content.config_records:
        content["site"] = reply.content.config_records["site"]
    return Message(content, reply_to=msg)


def _keep_shares(request: ConfigRecord, state: ConfigRecord) -> tuple[list[int], list[int]]:
    """The verified neighbours' shares, relayed: keep (in ``state``) those that decrypt and
    are addressed to this hospital. Returns who they came from, and who sent bad ones."""
    me, server_round = int(state["node"]), int(state["round"])
    peers = ids_in(state["peers"])
    held_from, held_seed, held_key, bad = [], [], [], []
    for src, ciphertext in zip(ids_in(request["sources"]), request["ciphertexts"], strict=True):
        if src not in peers:  # not verified here: its shares protect nothing of mine
            logger.warning("secure aggregation: ignored shares from unverified node %d", src)
            continue
        try:
            peer_c = bytes(state["peer-c"][peers.index(src)])
            key = crypto.agree(bytes(state["c-private"]), peer_c, crypto.SHARE_PURPOSE)
            plain = crypto.decrypt(key, bytes(ciphertext), crypto.share_aad(server_round, src, me))
            got_src, got_dst, seed_share, key_share = crypto.unpack_shares(plain)
            if (got_src, got_dst) != (src, me):
                raise SecAggError("share names other hospitals than its envelope")
        except SecAggError as err:
            logger.warning("secure aggregation: bad share from node %d: %s", src, err)
            bad.append(src)
            continue
        held_from.append(src)
        held_seed.append(seed_share)
        held_key.append(key_share)
    state["held-from"], state["held-seed"], state["held-key"] = (
        ids_out(held_from), held_seed, held_key)
    return held_from, bad


def _quantized_update(msg: Message, request: ConfigRecord, state: ConfigRecord,
                      reply: Message) -> tuple[np.ndarray, int]:
    """The trained update (``new - start`` over the round's declared tensors, finite or
    refused), scaled by the hospital's weight share and quantised: codes and how many values
    were clipped."""
    keys = [str(k) for k in request["keys"]]
    start = msg.content.array_records["arrays"]
    new = reply.content.array_records["arrays"]
    if set(new) != set(keys):
        raise SecAggError("trained tensors differ from the round's declared tensors")
    delta = (flatten({k: new[k].numpy() for k in keys}, keys)
             - flatten({k: start[k].numpy() for k in keys}, keys))
    check_finite_tensors({"update": delta}, "the update to mask")
    ratio = weight_ratio(float(state["weight"]), request["max-weight"])
    bits, _ = masking_bits(request["quantization-bits"], request["modulus-bits"])
    # Rounding noise needs no secrecy; seeding it from the run makes a study replayable.
    run_seed = int(msg.content.config_records["config"].get("seed", 0))
    rng = np.random.default_rng([run_seed, int(state["round"]), int(state["node"]) % 2**32])
    codes, clipped = quantize(ratio * delta, float(request["clipping-range"]), bits, rng)
    if clipped:
        logger.warning("secure aggregation: %d of %d update values clipped to +-%g", clipped,
                       codes.size, float(request["clipping-range"]))
    return codes, clipped


def _masked(codes: np.ndarray, request: ConfigRecord, state: ConfigRecord,
            held_from: list[int]) -> np.ndarray:
    """``codes`` plus this hospital's own mask and, with each neighbour in ``held_from``, the
    pairwise mask (added below it, subtracted above), modulo ``2**modulus_bits``."""
    _, modulus_bits = masking_bits(request["quantization-bits"], request["modulus-bits"])
    me, peers = int(state["node"]), ids_in(state["peers"])
    masked = codes + crypto.mask(bytes(state["seed"]), codes.size, modulus_bits)
    # Pairwise masks only with neighbours whose shares arrived intact: the coordinator can
    # rebuild exactly those hospitals' keys if they drop out (Bell et al.'s set U2).
    for peer in held_from:
        peer_s = bytes(state["peer-s"][peers.index(peer)])
        seed = crypto.agree(bytes(state["s-private"]), peer_s, crypto.MASK_PURPOSE)
        pairwise = crypto.mask(seed, codes.size, modulus_bits)
        masked = masked + pairwise if me < peer else masked - pairwise
    if modulus_bits < 32:
        masked &= np.uint32((1 << modulus_bits) - 1)
    return masked


def weight_ratio(weight: float, max_weight: object) -> float:
    """``min(w, w_max) / w_max``, the share of its update a hospital adds to the sum, in
    [0, 1]; ``w_max`` (the coordinator's) must be a finite number above 0 (a NaN would make
    every coordinate NaN, an infinity every one 0)."""
    if isinstance(max_weight, bool) or not isinstance(max_weight, int | float):
        raise SecAggError(f"max-weight {max_weight!r} is not a number")
    if check_finite_number(max_weight, "max-weight") <= 0:
        raise SecAggError(f"max-weight {max_weight!r} must be above 0")
    return min(weight, float(max_weight)) / float(max_weight)


def masking_bits(bits: object, modulus_bits: object) -> tuple[int, int]:
    """The coordinator's quantisation and modulus bits, as whole numbers with
    ``1 <= bits < modulus_bits <= 32`` (a modulus past 32 bits does not fit uint32)."""
    for value in (bits, modulus_bits):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SecAggError(f"masking bits {value!r} are not a whole number")
    if not 1 <= bits < modulus_bits <= 32:  # type: ignore[operator]
        raise SecAggError(f"masking bits {bits}/{modulus_bits} outside 1 <= bits < "
                          "modulus <= 32")
    return int(bits), int(modulus_bits)  # type: ignore[call-overload]


def _train_message(msg: Message, state: ConfigRecord) -> Message:
    """The plain ``train`` message inside a masked-input request (same metadata)."""
    from core.flower_compat import make_message

    config = ConfigRecord(dict(msg.content.config_records["config"]))
    if "update-clip-norm" in config:
        # Client-level DP from what this hospital checked, not what the coordinator sent: the
        # noise is split over at most the enrolled hospitals, and the ledger charges the
        # smallest sum this hospital lets be unmasked among verified peers adding at least its
        # noise share (1: released alone, when too few peers verified).
        config["update-hospitals"] = int(state["noise-hospitals"])
        config["update-min-sum-size"] = int(state["charge-sum"])
    return make_message(msg.metadata, RecordDict({
        "arrays": msg.content.array_records["arrays"], "config": config}))


def _check(request: ConfigRecord, context: Context, identity: SecAggIdentity) -> ConfigRecord:
    state = _state(context, int(request["round"]))
    me = int(state["node"])
    if not state.get("masked", False):
        raise SecAggError("this hospital sent no masked input this round")
    survivors = sorted(ids_in(request["survivors"]))
    if len(set(survivors)) != len(survivors) or me not in survivors:
        raise SecAggError("the survivor set repeats a hospital or leaves out this one, whose "
                          "masked input was sent")
    if state["survivors"] and ids_in(state["survivors"]) != survivors:
        raise SecAggError("asked to sign a second, different survivor set")
    state["survivors"] = ids_out(survivors)
    return ConfigRecord({"signature": sign_survivors(identity.key, context.run_id,
                                                     int(state["round"]), survivors)})


def _unmask(request: ConfigRecord, context: Context, identity: SecAggIdentity) -> ConfigRecord:
    state = _state(context, int(request["round"]))
    me = int(state["node"])
    dropped, survivors = ids_in(request["dropped"]), ids_in(request["survivors"])
    if set(dropped) & set(survivors):
        # Both shares of one hospital would let the coordinator unmask its single update.
        raise SecAggError("asked for both shares of the same hospital")
    signed = ids_in(state["survivors"])
    if not signed or sorted(survivors) != signed:
        raise SecAggError("asked to unmask a survivor set this hospital did not sign")
    # The consistency check: a majority of this hospital's verified group signed this very set.
    names = dict(zip(ids_in(state["peers"]), state["peer-names"], strict=True))
    signers = {me}
    for node, signature in zip(ids_in(request["signers"]), request["signatures"], strict=True):
        if node in names and verify_survivors(identity.roster, str(names[node]), context.run_id,
                                              int(state["round"]), signed, bytes(signature)):
            signers.add(node)
    if len(signers) < int(state["threshold"]):
        raise SecAggError(f"only {len(signers)} of this hospital's verified group signed the "
                          f"survivor set; it unmasks with at least {state['threshold']}")
    held = dict(zip(ids_in(state["held-from"]), zip(state["held-seed"], state["held-key"],
                                                    strict=True), strict=True))
    held[me] = (state["own-seed-share"], state["own-key-share"])
    # Only survivors this hospital holds verified shares of count: ids it never verified
    # (invented by the coordinator) do not make a sum larger.
    counted = sorted(set(signed) & set(held))
    if len(counted) < int(state["min-sum"]):
        raise SecAggError(f"only {len(counted)} verified hospitals would be summed; this "
                          f"hospital unmasks sums of at least {state['min-sum']}")
    key_of = [n for n in dropped if n in held and n != me and n not in signed]
    reply = ConfigRecord({
        "seed-of": ids_out(counted), "seed-shares": [bytes(held[n][0]) for n in counted],
        "key-of": ids_out(key_of), "key-shares": [bytes(held[n][1]) for n in key_of],
    })
    del context.state[STATE_KEY]  # the round's secrets are no longer needed
    return reply
