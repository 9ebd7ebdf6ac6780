"""The coordinator's side of SecAgg+: it learns the sum of the hospitals' updates, nothing else.

:class:`SecureAggregationGrid` wraps the Flower ``Grid`` a strategy talks to. Evaluation and
every other message pass through untouched; a round's training messages instead run the five
``train.secagg`` stages (see ``client.secure_aggregation``) and come back as one reply per
hospital that carries the hospital's plain metrics and the *aggregate* adapter
``global + sum(w_i * delta_i) / sum(w_i)``. Any strategy that needs only the weighted sum then
averages identical arrays and gets exactly that aggregate; strategies that need individual
updates are refused before the run starts (``needs_only_sum``).

Dropouts: a hospital that fails or times out at any stage is left out with its reason; the
round completes while at least the reconstruction threshold remains (survivors' self-masks are
rebuilt from their neighbours' shares, dropped hospitals' pairwise masks from their masking
keys' shares). Below it the round's replies are all errors naming why, and the round loop's
``min_hospitals`` rule decides the run's fate.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from models.lora_parts import exchanged_keys
from privacy.config import DPConfig
from privacy.secagg import SecAggConfig, SecAggError, crypto
from privacy.secagg.config import ACTION
from privacy.secagg.encoding import dequantize_sum, unflatten, vector_length
from privacy.secagg.graph import neighbour_graph
from privacy.secagg.wire import MASKED, RECORD, VECTOR, ids_in, ids_out
from server.delegating_grid import DelegatingGrid

logger = logging.getLogger(__name__)

EXCLUDED_CODE = 409
"""Flower error code of a hospital left out of a secure-aggregation round."""
UPLOAD_METRIC = "secagg-upload-bytes"
"""Metric the coordinator adds to each hospital's reply: bytes it sent over all stages."""
_MAX_COMBINATIONS = 64


@dataclass
class RoundReport:
    """What one secure-aggregation round did (for logs, tests and the benchmark).

    Attributes:
        server_round: the round.
        survivors: hospitals whose masked inputs are in the sum.
        excluded: hospitals left out, with why.
        upload_bytes: per hospital, bytes of arrays, keys and shares it sent in all stages.
        clipping_range: the per-coordinate range used for quantisation.
    """

    server_round: int
    survivors: list[int] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)
    upload_bytes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    clipping_range: float = 0.0


class SecureAggregationGrid(DelegatingGrid):
    """A Grid whose training rounds run SecAgg+; everything else passes to ``grid``.

    Args:
        grid: the run's Flower grid.
        config: the protocol's settings.
        weight_key: the reply metric the strategy weights updates by (``num-examples``, or
            ``update-weight`` under client-level DP); hospitals declare it at setup.
        clipping_range: per-coordinate range of the weighted update (default: the config's).
    """

    def __init__(self, grid: Grid, config: SecAggConfig, weight_key: str = "num-examples",
                 clipping_range: float | None = None) -> None:
        super().__init__(grid)
        self.config = config
        self.weight_key = weight_key
        self.clipping_range = clipping_range or config.clipping_range
        self.reports: list[RoundReport] = []

    # --- the protocol -----------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self._grid.send_and_receive(messages, timeout=timeout)
        protocol = _SecAggRound(self._grid, self.config, self.weight_key, self.clipping_range,
                                messages, timeout)
        replies = protocol.run()
        self.reports.append(protocol.report)
        return replies


@dataclass
class _SetupKeys:
    """A hospital's setup reply: its round keys, commitment, weight and what vouches for them."""

    c_public: bytes
    s_public: bytes
    commitment: bytes
    weight: float
    hospital: str = ""
    signature: bytes = b""
    noise_share: float = 0.0


class _SecAggRound:
    """One round of the protocol over the hospitals the strategy sampled: one method per stage
    (as Flower's ``SecAggPlusWorkflow``), each reading what the previous ones left on ``self``.
    """

    def __init__(self, grid: Grid, config: SecAggConfig, weight_key: str,
                 clipping_range: float, messages: list[Message], timeout: float | None) -> None:
        self.grid, self.config, self.weight_key = grid, config, weight_key
        self.clipping_range = clipping_range
        self.timeout = timeout
        self.key_timeout = config.stage_timeout_s or timeout
        self.requests = {m.metadata.dst_node_id: m for m in messages}
        content = messages[0].content
        self.arrays = content.array_records["arrays"]
        self.train_config = content.config_records["config"]
        self.server_round = int(self.train_config["server-round"])
        self.report = RoundReport(self.server_round, clipping_range=clipping_range)
        nodes = sorted(self.requests)
        self.threshold = config.threshold_count(len(nodes))
        self.graph = neighbour_graph(nodes, config.group_count(len(nodes)),
                                     seed=self.server_round)
        # Filled in stage by stage.
        self.keys: dict[int, _SetupKeys] = {}
        self.peers: dict[int, list[int]] = {}
        self.thresholds: dict[int, int] = {}
        self.relay: dict[int, dict[int, bytes]] = defaultdict(dict)
        self.shared: list[int] = []
        self.masked: dict[int, np.ndarray] = {}
        self.masked_with: dict[int, set[int]] = {}
        self.metrics: dict[int, MetricRecord] = {}
        self.sites: dict[int, ConfigRecord] = {}
        self.survivors: list[int] = []
        self.dropped: list[int] = []
        self.signatures: dict[int, bytes] = {}
        mode = str(self.train_config.get("adapter-exchange", "all"))
        self.names = sorted(exchanged_keys(list(self.arrays), mode))
        self.global_state = {k: self.arrays[k].numpy() for k in self.names}
        self.length = vector_length(self.global_state, self.names)
        self.max_weight = 0.0

    def run(self) -> list[Message]:
        nodes = sorted(self.requests)
        try:
            self.config.check(len(nodes))
            self.setup_stage(nodes)
            self.share_keys_stage()
            self.collect_masked_vectors_stage()
            self.consistency_check_stage()
            aggregate = self.unmask_stage()
        except SecAggError as err:
            logger.error("round %d: secure aggregation failed: %s", self.server_round, err)
            for node in nodes:
                self.report.excluded.setdefault(node, f"round failed: {err}")
            return [self._error(node) for node in nodes]
        self.report.survivors = self.survivors
        logger.info("round %d: secure aggregate of %d hospitals (%d left out)",
                    self.server_round, len(self.survivors), len(self.report.excluded))
        replies = []
        for node in nodes:
            if node not in self.survivors:
                replies.append(self._error(node))
                continue
            record = MetricRecord(dict(self.metrics[node]) | {
                UPLOAD_METRIC: int(self.report.upload_bytes[node])})
            content = RecordDict({"arrays": aggregate, "metrics": record})
            if node in self.sites:
                content["site"] = self.sites[node]
            replies.append(Message(content, reply_to=self.requests[node]))
        return replies

    # --- helpers ----------------------------------------------------------------------
    def _error(self, node: int) -> Message:
        reason = self.report.excluded.get(node, "left out of the secure aggregate")
        return Message(Error(code=EXCLUDED_CODE, reason=reason), reply_to=self.requests[node])

    def _exclude(self, node: int, reason: str) -> None:
        if node not in self.report.excluded:
            logger.warning("round %d: hospital node %d left out of secure aggregation: %s",
                           self.server_round, node, reason)
            self.report.excluded[node] = reason

    def _need(self, nodes: list[int], stage: str) -> None:
        if len(nodes) < self.threshold:
            raise SecAggError(f"only {len(nodes)} hospitals left after the {stage} stage; the "
                              f"reconstruction threshold is {self.threshold}")

    def _exchange(self, stage: str, contents: dict[int, RecordDict], timeout: float | None
                  ) -> dict[int, Message]:
        """One round trip; returns the replies that came back without error, by node."""
        messages = [Message(content, dst_node_id=node, message_type=f"{MessageType.TRAIN}."
                            f"{ACTION}", group_id=str(self.server_round))
                    for node, content in contents.items()]
        replies: dict[int, Message] = {}
        started = time.monotonic()
        got = list(self.grid.send_and_receive(messages, timeout=timeout))
        # The grid gave each message its id when it pushed it. An error the SuperLink answers
        # on a hospital's behalf (node unavailable, restarted) comes from node 1: it is filed
        # under the hospital that was asked, with its reason.
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
                 if m.metadata.message_id}
        for reply in got:
            node = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in contents:
                continue
            if reply.has_error():
                self._exclude(node, f"{stage}: {reply.error.reason}")
                continue
            self.report.upload_bytes[node] += _payload_bytes(reply)
            replies[node] = reply
        for node in contents:
            if node not in replies:
                self._exclude(node, f"{stage}: no reply within the timeout")
        logger.info("round %d: secure aggregation %s stage: %d of %d replies in %.1f s",
                    self.server_round, stage, len(replies), len(contents),
                    time.monotonic() - started)
        return replies

    def _stage_record(self, stage: str, **values) -> ConfigRecord:
        return ConfigRecord({"stage": stage, "round": self.server_round} | values)

    # --- the five stages --------------------------------------------------------------
    def setup_stage(self, nodes: list[int]) -> None:
        """1. Each hospital's signed public keys, seed commitment and weight."""
        replies = self._exchange("setup", {u: RecordDict({
            RECORD: self._stage_record(
                "setup", node=str(u), neighbours=ids_out(self.graph[u]),
                threshold=self.threshold, **{"weight-key": self.weight_key}),
            "config": self.train_config}) for u in nodes}, self.timeout)
        for u, reply in replies.items():
            record = reply.content.config_records.get(RECORD, ConfigRecord())
            try:
                keys = _SetupKeys(
                    bytes(record["c-public"]), bytes(record["s-public"]),
                    bytes(record["seed-commitment"]), float(record["weight"]),
                    str(record.get("hospital", "")), bytes(record.get("signature", b"")),
                    float(record.get("noise-share", 0.0)))
            except (KeyError, TypeError, ValueError):
                self._exclude(u, "setup: reply lacks keys, commitment or weight")
                continue
            if (len(keys.c_public), len(keys.s_public), len(keys.commitment)) != (32, 32, 32) \
                    or not (math.isfinite(keys.weight) and keys.weight > 0):
                self._exclude(u, "setup: malformed public keys, commitment or weight")
                continue
            self.keys[u] = keys
        self._need(sorted(self.keys), "setup")

    def share_keys_stage(self) -> None:
        """2. Relay the neighbours' signed keys; collect each hospital's encrypted shares (for
        the neighbours it verified) and the threshold it split its secrets with."""
        advertised = sorted(self.keys)
        self.peers = {u: [v for v in self.graph[u] if v in self.keys] for u in advertised}
        replies = self._exchange("share", {u: RecordDict({RECORD: self._stage_record(
            "share", peers=ids_out(self.peers[u]), **{
                "c-public": [self.keys[v].c_public for v in self.peers[u]],
                "s-public": [self.keys[v].s_public for v in self.peers[u]],
                "hospitals": [self.keys[v].hospital for v in self.peers[u]],
                "signatures": [self.keys[v].signature for v in self.peers[u]],
                "noise-shares": [self.keys[v].noise_share for v in self.peers[u]]})})
            for u in advertised}, self.key_timeout)
        for u, reply in replies.items():
            record = reply.content.config_records.get(RECORD, ConfigRecord())
            try:
                destinations = ids_in(record["destinations"])
                ciphertexts = [bytes(c) for c in record["ciphertexts"]]
                threshold = int(record["threshold"])
            except (KeyError, TypeError, ValueError):
                self._exclude(u, "share: reply lacks destinations, ciphertexts or threshold")
                continue
            # A hospital shares with the neighbours it verified: a subset, each once.
            if (not set(destinations) <= set(self.peers[u])
                    or len(set(destinations)) != len(destinations)
                    or len(ciphertexts) != len(destinations)
                    or not 1 <= threshold <= len(destinations) + 1):
                self._exclude(u, "share: malformed shares (wrong recipients or count)")
                continue
            self.thresholds[u] = threshold
            for v, ciphertext in zip(destinations, ciphertexts, strict=True):
                self.relay[v][u] = ciphertext
        self.shared = sorted(u for u in replies if u not in self.report.excluded)
        self._need(self.shared, "share")

    def collect_masked_vectors_stage(self) -> None:
        """3. Hospitals train and send masked, quantised, weighted updates."""
        self.max_weight = self.config.max_weight or max(self.keys[u].weight for u in self.shared)
        contents = {}
        for u in self.shared:
            sources = [v for v in self.peers[u] if v in self.shared and v in self.relay[u]]
            contents[u] = RecordDict({
                "arrays": self.arrays, "config": self.train_config,
                RECORD: self._stage_record(
                    "mask", sources=ids_out(sources),
                    ciphertexts=[self.relay[u][v] for v in sources], keys=self.names,
                    **{"max-weight": float(self.max_weight),
                       "clipping-range": float(self.clipping_range),
                       "quantization-bits": self.config.quantization_bits,
                       "modulus-bits": self.config.modulus_bits}),
            })
        replies = self._exchange("mask", contents, self.timeout)
        for u, reply in replies.items():
            record = reply.content.config_records.get(RECORD, ConfigRecord())
            vector = reply.content.array_records.get(MASKED, ArrayRecord()).get(VECTOR)
            if vector is None or vector.dtype != "uint32" or tuple(vector.shape) != (
                    self.length,):
                got = "none" if vector is None else f"{vector.dtype}{list(vector.shape)}"
                self._exclude(u, f"mask: masked vector is {got}, expected uint32[{self.length}]")
                continue
            try:
                self.masked_with[u] = set(ids_in(record["masked-with"]))
                for bad in ids_in(record["bad-shares-from"]):
                    self._exclude(bad, f"mask: its shares failed to decrypt at node {u}")
            except (KeyError, TypeError, ValueError):
                self._exclude(u, "mask: reply lacks its masking neighbours")
                continue
            if "metrics" not in reply.content.metric_records:
                self._exclude(u, "mask: reply carries no metrics")
                continue
            self.masked[u] = vector.numpy().astype(np.int64)
            self.metrics[u] = reply.content.metric_records["metrics"]
            if "site" in reply.content.config_records:
                self.sites[u] = reply.content.config_records["site"]
        self.survivors = sorted(u for u in self.masked if u not in self.report.excluded)
        self.dropped = sorted(u for u in self.shared if u not in self.survivors)
        self._need(self.survivors, "masked-input")

    def consistency_check_stage(self) -> None:
        """4. Every survivor signs the survivor set; a hospital later unmasks only a set a
        majority of its group signed, so all see the same one."""
        replies = self._exchange("check", {v: RecordDict({RECORD: self._stage_record(
            "check", survivors=ids_out(self.survivors))}) for v in self.survivors},
            self.key_timeout)
        for v, reply in replies.items():
            try:
                self.signatures[v] = bytes(reply.content.config_records[RECORD]["signature"])
            except (KeyError, TypeError, ValueError):
                logger.warning("round %d: node %d signed no survivor set; it cannot unmask",
                               self.server_round, v)

    def unmask_stage(self) -> ArrayRecord:
        """5. Survivors' seed shares and dropped hospitals' key shares; remove the masks and
        return ``global + sum(w_i * delta_i) / sum(w_i)``."""
        signers = sorted(self.signatures)
        replies = self._exchange("unmask", {v: RecordDict({RECORD: self._stage_record(
            "unmask", dropped=ids_out(u for u in self.dropped if u in self.peers[v]),
            survivors=ids_out(self.survivors), signers=ids_out(signers),
            signatures=[self.signatures[u] for u in signers])})
            for v in signers}, self.key_timeout)
        seed_shares: dict[int, list[bytes]] = defaultdict(list)
        key_shares: dict[int, list[bytes]] = defaultdict(list)
        for v, reply in replies.items():
            record = reply.content.config_records.get(RECORD, ConfigRecord())
            try:
                for w, share in zip(ids_in(record["seed-of"]), record["seed-shares"],
                                    strict=True):
                    seed_shares[w].append(bytes(share))
                for u, share in zip(ids_in(record["key-of"]), record["key-shares"],
                                    strict=True):
                    key_shares[u].append(bytes(share))
            except (KeyError, TypeError, ValueError):
                logger.warning("round %d: node %d sent malformed unmasking shares; ignored",
                               self.server_round, v)
        total = self._unmasked_sum(seed_shares, key_shares)
        weighted_sum = dequantize_sum(total, len(self.survivors), self.clipping_range,
                                      self.config.quantization_bits)
        weight_sum = sum(min(self.keys[w].weight, self.max_weight) / self.max_weight
                         for w in self.survivors)
        average = unflatten(weighted_sum / weight_sum, self.global_state, self.names)
        aggregate = ArrayRecord()
        for key, array in self.arrays.items():
            value = array.numpy()
            if key in average:
                value = (value.astype(np.float64) + average[key]).astype(value.dtype)
            aggregate[key] = Array(value)
        return aggregate

    def _unmasked_sum(self, seed_shares: dict[int, list[bytes]],
                      key_shares: dict[int, list[bytes]]) -> np.ndarray:
        """The sum of the survivors' quantised inputs, mod ``2**modulus_bits``: their masked
        vectors less their self-masks and the pairwise masks shared with dropped hospitals."""
        modulus, bits = 1 << self.config.modulus_bits, self.config.modulus_bits
        total = np.zeros(self.length, dtype=np.int64)
        for w in self.survivors:
            total += self.masked[w]
            seed = self._rebuild(w, seed_shares[w],
                                 lambda s, w=w: crypto.commitment(s) == self.keys[w].commitment)
            total -= crypto.mask(seed, self.length, bits).astype(np.int64)
            total %= modulus
        for u in self.dropped:
            partners = [v for v in self.survivors if u in self.masked_with[v]]
            if not partners:
                continue
            private = self._rebuild(u, key_shares[u],
                                    lambda s, u=u: crypto.public_of(s) == self.keys[u].s_public)
            for v in partners:
                seed = crypto.agree(private, self.keys[v].s_public, crypto.MASK_PURPOSE)
                pairwise = crypto.mask(seed, self.length, bits).astype(np.int64)
                total = (total - pairwise if v < u else total + pairwise) % modulus
        return total

    def _rebuild(self, node: int, shares: list[bytes], valid) -> bytes:
        """Node ``node``'s secret from ``shares``, checked by ``valid`` (tries subsets of the
        threshold the node split it with)."""
        threshold = self.thresholds.get(node, self.threshold)
        if len(shares) < threshold:
            raise SecAggError(f"only {len(shares)} shares of node {node}'s secret came back; "
                              f"{threshold} are needed")
        candidates = itertools.chain([shares], itertools.combinations(shares, threshold))
        for subset in itertools.islice(candidates, _MAX_COMBINATIONS):
            try:
                secret = crypto.combine_secret(list(subset))
            except SecAggError:
                continue
            if len(secret) == crypto.KEY_BYTES and valid(secret):
                return secret
        raise SecAggError(f"the shares of node {node}'s secret do not rebuild it (a hospital "
                          "sent false shares)")


def _payload_bytes(message: Message) -> int:
    """Bytes a reply carries: array data plus the bytes and strings of its config records."""
    total = sum(len(a.data) for record in message.content.array_records.values()
                for a in record.values())
    for record in message.content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, (bytes, str)))
    return total


def secure_grid(grid: Grid, config: SecAggConfig, strategy, dp: DPConfig | None = None
                ) -> SecureAggregationGrid:
    """``grid`` wrapped so that ``strategy``'s training rounds run under secure aggregation.

    With client-level DP the hospitals' noise is inside the masked values, so the quantisation
    range is widened to hold it: at least ``C + 6 * z * C / sqrt(n)`` per coordinate.

    Raises:
        SecAggError: ``strategy`` needs individual updates (``needs_only_sum`` is False).
    """
    if not getattr(strategy, "needs_only_sum", False):
        raise SecAggError(f"strategy {type(strategy).__name__} needs each hospital's update and "
                          "cannot run under secure aggregation")
    clipping = config.clipping_range
    if dp is not None and dp.update_dp:
        share_std = (dp.update_noise_multiplier * dp.update_clip_norm
                     / math.sqrt(max(dp.update_hospitals, 1)))
        needed = dp.update_clip_norm + 6 * share_std
        if needed > clipping:
            logger.info("secure aggregation: quantisation range widened from %g to %g to hold "
                        "the hospitals' DP noise", clipping, needed)
            clipping = needed
    return SecureAggregationGrid(grid, config, strategy.train_weighted_by_key, clipping)
