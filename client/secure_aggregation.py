"""The hospital's side of SecAgg+: its update leaves only masked, so the coordinator sees sums.

Four ``train.secagg`` messages per round (see ``privacy.secagg``):

1. ``setup``: make two X25519 key pairs (one to encrypt shares, one to agree masks) and a
   self-mask seed; send the public keys, a commitment to the seed, and the averaging weight.
2. ``share``: split the masking private key and the seed into Shamir shares, one per
   neighbour (and one kept), each encrypted for its neighbour; the coordinator relays them.
3. ``mask``: receive the global adapter and the neighbours' encrypted shares; train as in a
   plain round (site policy, DP, ledger); send the weighted update ``new - global`` quantised
   and masked with the self-mask and one pairwise mask per neighbour, plus the plain metrics.
4. ``unmask``: for each neighbour that dropped out send its masking-key share, for each that
   stayed its seed share - never both for one hospital, which would unmask its update.

Secrets live in ``context.state`` for the round only and are deleted after ``unmask``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client.run_policy import policy_min_hospitals
from privacy.secagg import SecAggError, crypto
from privacy.secagg.encoding import flatten, quantize
from privacy.secagg.wire import MASKED, RECORD, VECTOR, ids_in, ids_out

logger = logging.getLogger(__name__)

STATE_KEY = "secagg-state"
"""Where the round's secrets are kept in ``context.state`` between stages."""
PROTOCOL_ERROR = 422
"""Flower error code of a stage the hospital refuses (malformed or unsafe request)."""

TrainHandler = Callable[[Message, Context], Message]
"""A plain training round: the ``train`` message in, the reply (adapter + metrics) out."""
WeightOf = Callable[[Message, Context, str], float]
"""The hospital's averaging weight for the round: ``(setup message, context, weight key)``."""


def handle_secagg(msg: Message, context: Context, train: TrainHandler,
                  weight_of: WeightOf) -> Message:
    """Answer one stage of the protocol; a refused or broken stage is an error reply."""
    try:
        request = msg.content.config_records[RECORD]
        stage = str(request["stage"])
        if stage == "setup":
            return _reply(msg, _setup(msg, request, context, weight_of))
        if stage == "share":
            return _reply(msg, _share(request, context))
        if stage == "mask":
            return _mask(msg, request, context, train)
        if stage == "unmask":
            return _reply(msg, _unmask(request, context))
        raise SecAggError(f"unknown secure-aggregation stage '{stage}'")
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


def _setup(msg: Message, request: ConfigRecord, context: Context,
           weight_of: WeightOf) -> ConfigRecord:
    c_private, c_public = crypto.generate_keypair()
    s_private, s_public = crypto.generate_keypair()
    seed = crypto.random_seed()
    weight = float(weight_of(msg, context, str(request["weight-key"])))
    threshold = int(request["threshold"])
    context.state[STATE_KEY] = ConfigRecord({
        "round": int(request["round"]), "node": str(request["node"]),
        "threshold": threshold,
        # The fewest hospitals whose sum this hospital helps unmask: the protocol's threshold
        # or its own run policy's minimum, whichever is larger.
        "min-sum": max(threshold, policy_min_hospitals(context)),
        "neighbours": list(request["neighbours"]),
        "c-private": c_private, "s-private": s_private, "seed": seed, "weight": weight,
        "peers": [], "peer-c": [], "peer-s": [],
        "held-from": [], "held-seed": [], "held-key": [], "own-seed-share": b"",
        "own-key-share": b"",
    })
    return ConfigRecord({"c-public": c_public, "s-public": s_public,
                         "seed-commitment": crypto.commitment(seed), "weight": weight})


def _share(request: ConfigRecord, context: Context) -> ConfigRecord:
    state = _state(context, int(request["round"]))
    me = int(state["node"])
    peers = ids_in(request["peers"])
    if not set(peers) <= set(ids_in(state["neighbours"])) or me in peers:
        raise SecAggError("the coordinator sent keys of hospitals that are not my neighbours")
    c_keys, s_keys = list(request["c-public"]), list(request["s-public"])
    if not len(peers) == len(c_keys) == len(s_keys):
        raise SecAggError("peer list and public keys differ in length")
    threshold = int(state["threshold"])
    if len(peers) + 1 < threshold:
        raise SecAggError(f"{len(peers)} neighbours left, the threshold needs {threshold - 1}")
    members = sorted([me, *peers])
    seed_shares = crypto.split_secret(bytes(state["seed"]), threshold, len(members))
    key_shares = crypto.split_secret(bytes(state["s-private"]), threshold, len(members))
    server_round = int(state["round"])
    destinations, ciphertexts = [], []
    for index, node in enumerate(members):
        if node == me:
            state["own-seed-share"], state["own-key-share"] = seed_shares[index], key_shares[index]
            continue
        peer_c = c_keys[peers.index(node)]
        key = crypto.agree(bytes(state["c-private"]), peer_c, crypto.SHARE_PURPOSE)
        plaintext = crypto.pack_shares(me, node, seed_shares[index], key_shares[index])
        ciphertexts.append(crypto.encrypt(key, plaintext,
                                          crypto.share_aad(server_round, me, node)))
        destinations.append(node)
    state["peers"], state["peer-c"], state["peer-s"] = ids_out(peers), c_keys, s_keys
    return ConfigRecord({"destinations": ids_out(destinations), "ciphertexts": ciphertexts})


def _mask(msg: Message, request: ConfigRecord, context: Context, train: TrainHandler) -> Message:
    state = _state(context, int(request["round"]))
    me, server_round = int(state["node"]), int(state["round"])
    peers = ids_in(state["peers"])
    # The neighbours' shares, relayed: keep those that decrypt and are addressed to me.
    held_from, held_seed, held_key, bad = [], [], [], []
    for src, ciphertext in zip(ids_in(request["sources"]), request["ciphertexts"], strict=True):
        try:
            if src not in peers:
                raise SecAggError(f"share from {src}, not a neighbour")
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

    reply = train(_train_message(msg, state), context)
    if reply.has_error():
        return Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=msg)

    keys = [str(k) for k in request["keys"]]
    start = msg.content.array_records["arrays"]
    new = reply.content.array_records["arrays"]
    if set(new) != set(keys):
        raise SecAggError("trained tensors differ from the round's declared tensors")
    delta = (flatten({k: new[k].numpy() for k in keys}, keys)
             - flatten({k: start[k].numpy() for k in keys}, keys))
    weight = float(state["weight"])
    max_weight = float(request["max-weight"])
    ratio = min(weight, max_weight) / max_weight
    bits, modulus_bits = int(request["quantization-bits"]), int(request["modulus-bits"])
    # Rounding noise needs no secrecy; seeding it from the run makes a study replayable.
    run_seed = int(msg.content.config_records["config"].get("seed", 0))
    rng = np.random.default_rng([run_seed, server_round, me % 2**32])
    codes, clipped = quantize(ratio * delta, float(request["clipping-range"]), bits, rng)
    if clipped:
        logger.warning("secure aggregation: %d of %d update values clipped to +-%g", clipped,
                       codes.size, float(request["clipping-range"]))
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
    content = RecordDict({
        MASKED: ArrayRecord({VECTOR: Array(masked.astype(np.uint32))}),
        RECORD: ConfigRecord({"masked-with": ids_out(held_from),
                              "bad-shares-from": ids_out(bad), "clipped": clipped}),
    })
    for name, record in reply.content.metric_records.items():
        content[name] = record
    if "site" in reply.content.config_records:
        content["site"] = reply.content.config_records["site"]
    return Message(content, reply_to=msg)


def _train_message(msg: Message, state: ConfigRecord) -> Message:
    """The plain ``train`` message inside a masked-input request (same metadata)."""
    from flwr.app.message.message import make_message

    config = ConfigRecord(dict(msg.content.config_records["config"]))
    if "update-clip-norm" in config:
        # Client-level DP: the ledger charges the noise of the smallest sum this hospital will
        # let the coordinator unmask - its own threshold, not a number the coordinator sent.
        config["update-secure-sum"] = int(state["min-sum"])
    return make_message(msg.metadata, RecordDict({
        "arrays": msg.content.array_records["arrays"], "config": config}))


def _unmask(request: ConfigRecord, context: Context) -> ConfigRecord:
    state = _state(context, int(request["round"]))
    me = int(state["node"])
    dropped, survivors = ids_in(request["dropped"]), ids_in(request["survivors"])
    if set(dropped) & set(survivors):
        # Both shares of one hospital would let the coordinator unmask its single update.
        raise SecAggError("asked for both shares of the same hospital")
    if len(survivors) < int(state["min-sum"]):
        raise SecAggError(f"only {len(survivors)} hospitals would be summed; this hospital "
                          f"unmasks sums of at least {state['min-sum']}")
    held = dict(zip(ids_in(state["held-from"]), zip(state["held-seed"], state["held-key"],
                                                    strict=True), strict=True))
    held[me] = (state["own-seed-share"], state["own-key-share"])
    seed_of = [n for n in survivors if n in held]
    key_of = [n for n in dropped if n in held and n != me]
    reply = ConfigRecord({
        "seed-of": ids_out(seed_of), "seed-shares": [bytes(held[n][0]) for n in seed_of],
        "key-of": ids_out(key_of), "key-shares": [bytes(held[n][1]) for n in key_of],
    })
    del context.state[STATE_KEY]  # the round's secrets are no longer needed
    return reply
