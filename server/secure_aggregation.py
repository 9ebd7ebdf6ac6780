"""The coordinator's side of SecAgg+: it learns the sum of the hospitals' updates, nothing else.

:class:`SecureAggregationGrid` wraps the Flower ``Grid`` a strategy talks to. Evaluation and
every other message pass through untouched; a round's training messages instead run the four
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


class _SecAggRound:
    """One round of the protocol over the hospitals the strategy sampled."""

    def __init__(self, grid: Grid, config: SecAggConfig, weight_key: str,
                 clipping_range: float, messages: list[Message], timeout: float | None) -> None:
        self.grid, self.config, self.weight_key = grid, config, weight_key
        self.clipping_range = clipping_range
        self.timeout = timeout
        self.requests = {m.metadata.dst_node_id: m for m in messages}
        content = messages[0].content
        self.arrays = content.array_records["arrays"]
        self.train_config = content.config_records["config"]
        self.server_round = int(self.train_config["server-round"])
        self.report = RoundReport(self.server_round, clipping_range=clipping_range)

    def run(self) -> list[Message]:
        nodes = sorted(self.requests)
        try:
            self.config.check(len(nodes))
            aggregate, survivors, metrics, sites = self._protocol(nodes)
        except SecAggError as err:
            logger.error("round %d: secure aggregation failed: %s", self.server_round, err)
            for node in nodes:
                self.report.excluded.setdefault(node, f"round failed: {err}")
            return [self._error(node) for node in nodes]
        self.report.survivors = survivors
        logger.info("round %d: secure aggregate of %d hospitals (%d left out)",
                    self.server_round, len(survivors), len(self.report.excluded))
        replies = []
        for node in nodes:
            if node not in survivors:
                replies.append(self._error(node))
                continue
            record = MetricRecord(dict(metrics[node]) | {
                UPLOAD_METRIC: int(self.report.upload_bytes[node])})
            content = RecordDict({"arrays": aggregate, "metrics": record})
            if node in sites:
                content["site"] = sites[node]
            replies.append(Message(content, reply_to=self.requests[node]))
        return replies

    def _error(self, node: int) -> Message:
        reason = self.report.excluded.get(node, "left out of the secure aggregate")
        return Message(Error(code=EXCLUDED_CODE, reason=reason), reply_to=self.requests[node])

    def _exclude(self, node: int, reason: str) -> None:
        if node not in self.report.excluded:
            logger.warning("round %d: hospital node %d left out of secure aggregation: %s",
                           self.server_round, node, reason)
            self.report.excluded[node] = reason

    def _need(self, nodes: list[int], stage: str) -> None:
        threshold = self.config.threshold_count(len(self.requests))
        if len(nodes) < threshold:
            raise SecAggError(f"only {len(nodes)} hospitals left after the {stage} stage; the "
                              f"reconstruction threshold is {threshold}")

    def _exchange(self, stage: str, contents: dict[int, RecordDict], timeout: float | None
                  ) -> dict[int, Message]:
        """One round trip; returns the replies that came back without error, by node."""
        messages = [Message(content, dst_node_id=node, message_type=f"{MessageType.TRAIN}."
                            f"{ACTION}", group_id=str(self.server_round))
                    for node, content in contents.items()]
        replies: dict[int, Message] = {}
        started = time.monotonic()
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
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

    def _protocol(self, nodes: list[int]):
        n = len(nodes)
        shares, threshold = self.config.share_count(n), self.config.threshold_count(n)
        graph = neighbour_graph(nodes, shares, seed=self.server_round)
        key_timeout = self.config.stage_timeout_s or self.timeout

        # 1. setup: public keys, seed commitments and weights.
        replies = self._exchange("setup", {u: RecordDict({
            RECORD: self._stage_record(
                "setup", node=str(u), neighbours=ids_out(graph[u]), threshold=threshold,
                **{"weight-key": self.weight_key}),
            "config": self.train_config}) for u in nodes}, self.timeout)
        keys: dict[int, tuple[bytes, bytes, bytes, float]] = {}
        for u, reply in replies.items():
            record = reply.content.config_records.get(RECORD, ConfigRecord())
            try:
                c_pub, s_pub = bytes(record["c-public"]), bytes(record["s-public"])
                commit, weight = bytes(record["seed-commitment"]), float(record["weight"])
            except (KeyError, TypeError, ValueError):
                self._exclude(u, "setup: reply lacks keys, commitment or weight")
                continue
            if (len(c_pub), len(s_pub), len(commit)) != (32, 32, 32) or not (
                    math.isfinite(weight) and weight > 0):
                self._exclude(u, "setup: malformed public keys, commitment or weight")
                continue
            keys[u] = (c_pub, s_pub, commit, weight)
        advertised = sorted(keys)
        self._need(advertised, "setup")

        # 2. share: each hospital's encrypted shares, relayed below.
        peers = {u: [v for v in graph[u] if v in keys] for u in advertised}
        replies = self._exchange("share", {u: RecordDict({RECORD: self._stage_record(
            "share", peers=ids_out(peers[u]), **{
                "c-public": [keys[v][0] for v in peers[u]],
                "s-public": [keys[v][1] for v in peers[u]]})}) for u in advertised}, key_timeout)
        relay: dict[int, dict[int, bytes]] = defaultdict(dict)
        for u, reply in replies.items():
            record = reply.content.config_records.get(RECORD, ConfigRecord())
            try:
                destinations = ids_in(record["destinations"])
                ciphertexts = [bytes(c) for c in record["ciphertexts"]]
            except (KeyError, TypeError, ValueError):
                self._exclude(u, "share: reply lacks destinations or ciphertexts")
                continue
            if sorted(destinations) != peers[u] or len(ciphertexts) != len(destinations):
                self._exclude(u, "share: malformed shares (wrong recipients or count)")
                continue
            for v, ciphertext in zip(destinations, ciphertexts, strict=True):
                relay[v][u] = ciphertext
        shared = sorted(u for u in replies if u not in self.report.excluded)
        self._need(shared, "share")

        # 3. mask: hospitals train and send masked, quantised, weighted updates.
        mode = str(self.train_config.get("adapter-exchange", "all"))
        names = sorted(exchanged_keys(list(self.arrays), mode))
        global_state = {k: self.arrays[k].numpy() for k in names}
        length = vector_length(global_state, names)
        max_weight = self.config.max_weight or max(keys[u][3] for u in shared)
        contents = {}
        for u in shared:
            sources = [v for v in peers[u] if v in shared and u in relay and v in relay[u]]
            contents[u] = RecordDict({
                "arrays": self.arrays, "config": self.train_config,
                RECORD: self._stage_record(
                    "mask", sources=ids_out(sources),
                    ciphertexts=[relay[u][v] for v in sources], keys=names,
                    **{"max-weight": float(max_weight),
                       "clipping-range": float(self.clipping_range),
                       "quantization-bits": self.config.quantization_bits,
                       "modulus-bits": self.config.modulus_bits}),
            })
        replies = self._exchange("mask", contents, self.timeout)
        masked, masked_with, metrics, sites = {}, {}, {}, {}
        for u, reply in replies.items():
            record = reply.content.config_records.get(RECORD, ConfigRecord())
            vector = reply.content.array_records.get(MASKED, ArrayRecord()).get(VECTOR)
            if vector is None or vector.dtype != "uint32" or tuple(vector.shape) != (length,):
                got = "none" if vector is None else f"{vector.dtype}{list(vector.shape)}"
                self._exclude(u, f"mask: masked vector is {got}, expected uint32[{length}]")
                continue
            try:
                masked_with[u] = set(ids_in(record["masked-with"]))
                for bad in ids_in(record["bad-shares-from"]):
                    self._exclude(bad, f"mask: its shares failed to decrypt at node {u}")
            except (KeyError, TypeError, ValueError):
                self._exclude(u, "mask: reply lacks its masking neighbours")
                continue
            if "metrics" not in reply.content.metric_records:
                self._exclude(u, "mask: reply carries no metrics")
                continue
            masked[u] = vector.numpy().astype(np.int64)
            metrics[u] = reply.content.metric_records["metrics"]
            if "site" in reply.content.config_records:
                sites[u] = reply.content.config_records["site"]
        survivors = sorted(u for u in masked if u not in self.report.excluded)
        dropped = sorted(u for u in shared if u not in survivors)
        self._need(survivors, "masked-input")

        # 4. unmask: survivors' seed shares and dropped hospitals' key shares.
        replies = self._exchange("unmask", {v: RecordDict({RECORD: self._stage_record(
            "unmask", dropped=ids_out(u for u in dropped if u in peers[v]),
            survivors=ids_out(w for w in survivors if w == v or w in peers[v]))})
            for v in survivors}, key_timeout)
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

        modulus = 1 << self.config.modulus_bits
        total = np.zeros(length, dtype=np.int64)
        for w in survivors:
            total += masked[w]
            seed = self._rebuild(w, seed_shares[w], threshold,
                                 lambda s, w=w: crypto.commitment(s) == keys[w][2])
            total -= crypto.mask(seed, length, self.config.modulus_bits).astype(np.int64)
            total %= modulus
        for u in dropped:
            partners = [v for v in survivors if u in masked_with[v]]
            if not partners:
                continue
            private = self._rebuild(u, key_shares[u], threshold,
                                    lambda s, u=u: crypto.public_of(s) == keys[u][1])
            for v in partners:
                pairwise = crypto.mask(crypto.agree(private, keys[v][1], crypto.MASK_PURPOSE),
                                       length, self.config.modulus_bits).astype(np.int64)
                total = (total - pairwise if v < u else total + pairwise) % modulus

        weighted_sum = dequantize_sum(total, len(survivors), self.clipping_range,
                                      self.config.quantization_bits)
        weight_sum = sum(min(keys[w][3], max_weight) / max_weight for w in survivors)
        average = unflatten(weighted_sum / weight_sum, global_state, names)
        aggregate = ArrayRecord()
        for key, array in self.arrays.items():
            value = array.numpy()
            if key in average:
                value = (value.astype(np.float64) + average[key]).astype(value.dtype)
            aggregate[key] = Array(value)
        return aggregate, survivors, metrics, sites

    def _rebuild(self, node: int, shares: list[bytes], threshold: int, valid) -> bytes:
        """Node ``node``'s secret from ``shares``, checked by ``valid`` (tries subsets)."""
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
