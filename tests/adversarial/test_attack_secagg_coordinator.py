"""A malicious coordinator against the hospitals' secure aggregation: it must not unmask one
hospital's update, nor make a hospital's ledger charge less than the noise that protects it.

Five real hospitals (``client.app``'s ClientApp on real PneumoniaMNIST, real LoRA training, real
keys from a CA-signed roster) answer messages the attacker crafts stage by stage. The attacker
holds everything a coordinator sees - every reply, the masked vectors, the shares it is sent,
the private keys of the neighbours it invents - and then tries every combination of the shares
it collected to rebuild the target's self-mask seed and the masking keys it needs. A test passes
when that reconstruction fails (or lands far from the true update), while the same
reconstruction with the target's real secrets recovers the true update: the check can fail.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.app import build_client_app
from client.privacy_round import SitePrivacy
from models.adapters import adapter_state
from models.config import ModelConfig, TrainConfig, to_config_record
from models.lora_parts import exchanged_keys
from models.registry import weights_sha256
from privacy.config import DPConfig
from privacy.ledger import Ledger
from privacy.secagg import crypto
from privacy.secagg.config import ACTION
from privacy.secagg.encoding import dequantize_sum
from privacy.secagg.identity import SetupKeys, sign_setup
from privacy.secagg.local_consortium import local_consortium
from privacy.secagg.wire import MASKED, RECORD, VECTOR, ids_in, ids_out
from server.rounds import initial_model
from simulations.config import DataConfig
from simulations.inprocess import InProcessGrid
from simulations.sites import SimulatedSiteLoader

NODES = [2**63 + 7 * k + 5 for k in range(5)]
TARGET, H1, H2, H3, H4 = NODES
FAKES = [2**62 + 1, 2**62 + 2]
CLIP, BITS, MODULUS = 1.0, 20, 32


@dataclass
class Attack:
    """A coordinator that runs the stages itself and keeps everything it receives."""

    grid: InProcessGrid
    configs: dict[int, ConfigRecord]
    arrays: ArrayRecord
    setup: dict[int, ConfigRecord] = field(default_factory=dict)
    shares: dict[int, ConfigRecord] = field(default_factory=dict)
    masked: dict[int, ConfigRecord] = field(default_factory=dict)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    signatures: dict[int, bytes] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    fakes: dict[int, tuple[bytes, bytes, bytes, bytes]] = field(default_factory=dict)
    seed_bag: dict[int, list[bytes]] = field(default_factory=dict)
    key_bag: dict[int, list[bytes]] = field(default_factory=dict)
    secrets: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def send(self, stage: str, records: dict[int, dict], train: bool = False
             ) -> dict[int, Message]:
        messages = []
        for node, values in records.items():
            content = RecordDict({RECORD: ConfigRecord({"stage": stage, "round": 1} | values)})
            if stage == "setup" or train:
                content["config"] = self.configs[node]
            if train:
                content["arrays"] = self.arrays
            messages.append(Message(content, dst_node_id=node, group_id="1",
                                    message_type=f"train.{ACTION}"))
        replies = {}
        for reply in self.grid.send_and_receive(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors[node] = f"{stage}: {reply.error.reason}"
            else:
                replies[node] = reply
        return replies

    # --- the stages, with whatever the attacker chooses to tell each hospital -------------
    def run_setup(self, neighbours: dict[int, list[int]], threshold: dict[int, int]) -> None:
        config = self.configs[TARGET]
        weight_key = "update-weight" if float(config.get("update-clip-norm", 0)) > 0 else (
            "num-examples")
        replies = self.send("setup", {n: {"node": str(n), "neighbours": ids_out(neighbours[n]),
                                          "threshold": threshold[n], "weight-key": weight_key}
                                      for n in neighbours})
        self.setup = {n: r.content.config_records[RECORD] for n, r in replies.items()}

    def invent(self, node: int, hospital: str, signer: ec.EllipticCurvePrivateKey | None
               ) -> None:
        """A neighbour the attacker makes up: its own X25519 keys, signed by ``signer``."""
        c_private, c_public = crypto.generate_keypair()
        s_private, s_public = crypto.generate_keypair()
        signature = b"" if signer is None else sign_setup(
            signer, SetupKeys(1, 1, node, c_public, s_public, 0.0))
        self.fakes[node] = (c_private, s_private, c_public, s_public)
        self.setup[node] = ConfigRecord({"c-public": c_public, "s-public": s_public,
                                         "hospital": hospital, "signature": signature,
                                         "noise-share": 0.0,
                                         "seed-commitment": bytes(32), "weight": 1.0})

    def run_share(self, peers: dict[int, list[int]]) -> None:
        def column(key, ps):
            return [self.setup[p][key] for p in ps]

        replies = self.send("share", {n: {
            "peers": ids_out(ps), "c-public": column("c-public", ps),
            "s-public": column("s-public", ps), "hospitals": column("hospital", ps),
            "signatures": column("signature", ps),
            "noise-shares": [float(v) for v in column("noise-share", ps)]}
            for n, ps in peers.items()})
        self.shares = {n: r.content.config_records[RECORD] for n, r in replies.items()}
        # Shares addressed to an invented neighbour: the attacker holds its key, it reads them.
        for src, record in self.shares.items():
            for dst, ciphertext in zip(ids_in(record["destinations"]), record["ciphertexts"],
                                       strict=True):
                if dst in self.fakes:
                    key = crypto.agree(self.fakes[dst][0], bytes(self.setup[src]["c-public"]),
                                       crypto.SHARE_PURPOSE)
                    plain = crypto.decrypt(key, bytes(ciphertext), crypto.share_aad(1, src, dst))
                    _, _, seed_share, key_share = crypto.unpack_shares(plain)
                    self.seed_bag.setdefault(src, []).append(seed_share)
                    self.key_bag.setdefault(src, []).append(key_share)

    def run_mask(self) -> None:
        names = sorted(exchanged_keys(list(self.arrays), "all"))
        max_weight = max(float(self.setup[n]["weight"]) for n in self.shares)
        relay: dict[int, dict[int, bytes]] = {n: {} for n in self.shares}
        for src, record in self.shares.items():
            for dst, ciphertext in zip(ids_in(record["destinations"]), record["ciphertexts"],
                                       strict=True):
                if dst in relay:
                    relay[dst][src] = bytes(ciphertext)
        replies = self.send("mask", {n: {
            "sources": ids_out(relay[n]), "ciphertexts": list(relay[n].values()), "keys": names,
            "max-weight": max_weight, "clipping-range": CLIP, "quantization-bits": BITS,
            "modulus-bits": MODULUS} for n in self.shares}, train=True)
        for n, reply in replies.items():
            self.masked[n] = reply.content.config_records[RECORD]
            self.vectors[n] = reply.content.array_records[MASKED][VECTOR].numpy()
            state = self.grid.contexts[n].state.config_records["secagg-state"]
            # The oracle (not the attacker): the hospital's real secrets, for the control.
            self.secrets[n] = (bytes(state["seed"]), bytes(state["s-private"]))

    def run_check(self, survivors: dict[int, list[int]]) -> None:
        replies = self.send("check", {n: {"survivors": ids_out(s)} for n, s in survivors.items()})
        self.signatures = {n: bytes(r.content.config_records[RECORD]["signature"])
                           for n, r in replies.items()}

    def run_unmask(self, views: dict[int, tuple[list[int], list[int]]]) -> None:
        signers = sorted(self.signatures)
        replies = self.send("unmask", {n: {
            "survivors": ids_out(s), "dropped": ids_out(d), "signers": ids_out(signers),
            "signatures": [self.signatures[u] for u in signers]}
            for n, (s, d) in views.items()})
        for reply in replies.values():
            record = reply.content.config_records[RECORD]
            for w, share in zip(ids_in(record["seed-of"]), record["seed-shares"], strict=True):
                self.seed_bag.setdefault(w, []).append(bytes(share))
            for u, share in zip(ids_in(record["key-of"]), record["key-shares"], strict=True):
                self.key_bag.setdefault(u, []).append(bytes(share))

    # --- what the attacker can rebuild ------------------------------------------------------
    def _rebuild(self, shares: list[bytes], valid) -> bytes | None:
        for size in range(1, len(shares) + 1):
            for subset in itertools.combinations(shares, size):
                try:
                    secret = crypto.combine_secret(list(subset))
                except Exception:  # noqa: BLE001 - any failure is a failed guess
                    continue
                if len(secret) == crypto.KEY_BYTES and valid(secret):
                    return secret
        return None

    def reconstruct(self, target: int, oracle: bool = False) -> np.ndarray | None:
        """The target's weighted update from what the attacker holds (``oracle``: from the
        target's real secrets instead); ``None`` when a secret it needs is out of reach."""
        if target not in self.vectors:
            return None
        s_public = {n: bytes(r["s-public"]) for n, r in self.setup.items()}
        if oracle:
            seed, s_target = self.secrets[target]
        else:
            seed = self._rebuild(self.seed_bag.get(target, []), lambda s: crypto.commitment(
                s) == bytes(self.setup[target]["seed-commitment"]))
            s_target = self._rebuild(self.key_bag.get(target, []),
                                     lambda s: crypto.public_of(s) == s_public[target])
        if seed is None:
            return None
        length = self.vectors[target].size
        total = self.vectors[target].astype(np.int64) - crypto.mask(seed, length, MODULUS)
        for peer in ids_in(self.masked[target]["masked-with"]):
            if s_target is not None:
                agreed = crypto.agree(s_target, s_public[peer], crypto.MASK_PURPOSE)
            else:
                s_peer = (self.fakes[peer][1] if peer in self.fakes else self._rebuild(
                    self.key_bag.get(peer, []),
                    lambda s, p=peer: crypto.public_of(s) == s_public[p]))
                if s_peer is None:
                    return None
                agreed = crypto.agree(s_peer, s_public[target], crypto.MASK_PURPOSE)
            pairwise = crypto.mask(agreed, length, MODULUS).astype(np.int64)
            total = total - pairwise if target < peer else total + pairwise
        return dequantize_sum(total % (1 << MODULUS), 1, CLIP, BITS)


def _model() -> ModelConfig:
    return ModelConfig(image_size=32, lora_r=4, lora_alpha=8,
                       weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))


def _attack(tmp_path: Path, dp: dict[int, DPConfig] | None = None, policy: str = "",
            min_hospitals: int = 3) -> tuple[Attack, object]:
    """Five real hospitals behind an attacker; ``dp`` per node (the coordinator may send
    each a different one); each hospital keeps a ledger in ``tmp_path``."""
    data = DataConfig(num_hospitals=5, partition="iid", max_train_examples=100,
                      max_test_examples=20)
    consortium = local_consortium(list(range(5)))

    def privacy(context):
        return SitePrivacy(ledger=Ledger(tmp_path / f"ledger-{context.node_config['partition-id']}"
                                                    ".sqlite"))

    app = build_client_app(SimulatedSiteLoader(data, 0), privacy, consortium)
    node_configs = {}
    for k, node in enumerate(NODES):
        node_configs[node] = {"partition-id": k}
        if policy:
            (tmp_path / "run-policy.toml").write_text(policy)
            node_configs[node]["run-policy"] = str(tmp_path / "run-policy.toml")
    grid = InProcessGrid(app, node_configs)
    model = _model()
    arrays = ArrayRecord(adapter_state(initial_model(model, 0)))
    configs = {}
    for node in NODES:
        parts = [model, TrainConfig(local_steps=1, batch_size=4)]
        if dp is not None:
            parts.append(dp[node])
        config = to_config_record(*parts)
        config["server-round"], config["min-hospitals"], config["task"] = 1, min_hospitals, ""
        configs[node] = config
    return Attack(grid, configs, arrays), consortium


def _complete(nodes: list[int]) -> dict[int, list[int]]:
    return {n: [m for m in nodes if m != n] for n in nodes}


def _assert_update_safe(attack: Attack) -> None:
    """The attacker cannot rebuild the target's update; with the real secrets it could."""
    truth = attack.reconstruct(TARGET, oracle=True)
    assert truth is not None and np.max(np.abs(truth)) <= CLIP  # decodes inside the range
    assert np.linalg.norm(truth) > 0
    attempt = attack.reconstruct(TARGET)
    assert attempt is None or np.max(np.abs(attempt - truth)) > CLIP


def _honest_start(attack: Attack, neighbours: dict[int, list[int]], threshold: int = 3
                  ) -> None:
    attack.run_setup(neighbours, {n: threshold for n in neighbours})
    attack.run_share({n: [p for p in ns if p in attack.setup] for n, ns in neighbours.items()})
    attack.run_mask()


# --- (a) invented neighbours --------------------------------------------------------------

@pytest.mark.parametrize("how", ["unsigned", "signed-by-stranger", "enrolled-key-twice"])
def test_invented_neighbours_do_not_count(tmp_path, how):
    """The coordinator gives the target two neighbours it made up (fresh keys): unsigned, signed
    by a key off the roster claiming an enrolled name, or one enrolled key under two node ids.
    With only them the target refuses; with two real neighbours besides, it shares only with
    the real ones, and the attacker cannot unmask it."""
    attack, consortium = _attack(tmp_path)
    stranger = ec.generate_private_key(ec.SECP384R1())
    stolen = serialization.load_pem_private_key(consortium.node_keys[1], password=None)
    signer = {"unsigned": None, "signed-by-stranger": stranger,
              "enrolled-key-twice": stolen}[how]
    # Alone with its invented neighbours, the target refuses before any share leaves.
    attack.run_setup({TARGET: FAKES}, {TARGET: 2})
    for fake in FAKES:
        attack.invent(fake, "hospital-1", signer)
    attack.run_share({TARGET: FAKES})
    assert TARGET not in attack.shares and "verified" in attack.errors[TARGET]

    # With two real neighbours as well: the fakes get nothing.
    attack, consortium = _attack(tmp_path / "mixed")
    real = {TARGET: [H1, H2, *FAKES], H1: [TARGET, H2], H2: [TARGET, H1]}
    attack.run_setup(real, {n: 2 for n in real})
    stolen = serialization.load_pem_private_key(consortium.node_keys[1], password=None)
    signer = {"unsigned": None, "signed-by-stranger": stranger,
              "enrolled-key-twice": stolen}[how]
    for fake in FAKES:
        attack.invent(fake, "hospital-1", signer)
    attack.run_share(real)
    assert not attack.seed_bag and not attack.key_bag  # nothing addressed to a fake
    if how == "enrolled-key-twice":  # hospital-1 counted neither time: too few peers left
        assert TARGET not in attack.shares or set(ids_in(
            attack.shares[TARGET]["destinations"])) <= {H2}
    else:
        assert set(ids_in(attack.shares[TARGET]["destinations"])) == {H1, H2}
    if TARGET not in attack.shares:
        return
    attack.run_mask()
    assert set(ids_in(attack.masked[TARGET]["masked-with"])) <= {H1, H2}
    members = [TARGET, H1, H2]
    attack.run_check({n: members for n in members})
    # The real three unmask their sum (seed shares only: nobody dropped); the target's
    # pairwise masks with its two real neighbours stay, so it is not isolated.
    attack.run_unmask({n: (members, []) for n in members})
    assert attack.seed_bag and not attack.key_bag
    _assert_update_safe(attack)


# --- (b) threshold 1, or 2 of 5 -------------------------------------------------------------

@pytest.mark.parametrize("threshold", [1, 2])
def test_low_threshold_is_raised_to_a_majority(tmp_path, threshold):
    """The coordinator asks for threshold 1 or 2 of 5, then shows hospitals two survivor sets
    so that one group reveals the target's seed and another its neighbours' masking keys (with
    threshold 2 that isolates the target). Every hospital splits with 3 of 5 instead and unmasks
    only a set 3 of its group signed: the target stays in a sum of three."""
    attack, _ = _attack(tmp_path)
    _honest_start(attack, _complete(NODES), threshold)
    assert all(int(r["threshold"]) >= 3 for r in attack.shares.values())
    inner, outer = [TARGET, H1, H2], [TARGET, H3, H4]
    attack.run_check({TARGET: outer, H1: inner, H2: inner, H3: outer, H4: outer})
    attack.run_unmask({TARGET: (outer, [H1, H2]), H1: (inner, [H3, H4]),
                       H2: (inner, [H3, H4]), H3: (outer, [H1, H2]), H4: (outer, [H1, H2])})
    # H1 and H2 saw only two signatures on their set: they revealed nothing.
    assert "signed" in attack.errors[H1] and "signed" in attack.errors[H2]
    _assert_update_safe(attack)


# --- (c) survivors the hospital never verified ---------------------------------------------

def test_invented_survivors_do_not_make_a_sum_large_enough(tmp_path):
    """With a run policy of at least 4 hospitals per sum, the coordinator pads a survivor set of
    three real hospitals with two invented ids: every hospital counts only the survivors it
    holds verified shares of, and reveals nothing."""
    attack, _ = _attack(tmp_path, policy='min_hospitals = 4\nallowed_tasks = [""]\n'
                        'allowed_backbones = ["efficientnet-lite0-imagenet"]\n', min_hospitals=4)
    _honest_start(attack, _complete(NODES))
    padded = [TARGET, H1, H2, *FAKES]
    attack.run_check({n: padded for n in (TARGET, H1, H2)})
    attack.run_unmask({n: (padded, [H3, H4]) for n in (TARGET, H1, H2)})
    assert all("at least 4" in attack.errors[n] for n in (TARGET, H1, H2))
    assert not attack.seed_bag and not attack.key_bag
    _assert_update_safe(attack)


# --- (d) lies about the hospitals and the noise ---------------------------------------------

def _charge(tmp_path: Path, hospital: int) -> list[float]:
    rows = Ledger(tmp_path / f"ledger-{hospital}.sqlite").rows()
    return [r.noise_multiplier for r in rows if r.mechanism.startswith("client-gaussian")]


def _dp_round(tmp_path: Path, dp: dict[int, DPConfig]) -> Attack:
    """A complete round in which each hospital gets its own (possibly lying) DP config."""
    attack, _ = _attack(tmp_path, dp=dp)
    _honest_start(attack, _complete(NODES))
    survivors = sorted(attack.vectors)
    attack.run_check({n: survivors for n in survivors})
    attack.run_unmask({n: (survivors, []) for n in survivors})
    return attack


HONEST = DPConfig(update_clip_norm=0.5, update_noise_multiplier=1.0, update_hospitals=5)


def test_a_lie_about_the_hospital_count_leaves_the_charge_unchanged(tmp_path):
    """Told 1000 hospitals share the noise (so each would add almost none), every hospital
    splits it over at most the 5 enrolled: the target's ledger charge is the honest round's."""
    honest = _dp_round(tmp_path / "honest", {n: HONEST for n in NODES})
    lie = _dp_round(tmp_path / "lie", {n: replace(HONEST, update_hospitals=1000)
                                       for n in NODES})
    want = HONEST.update_noise_multiplier * math.sqrt(3 / 5)  # a sum of at least 3 of 5
    assert _charge(tmp_path / "honest", 0) == pytest.approx([want])
    assert _charge(tmp_path / "lie", 0) == pytest.approx([want])
    for attack in (honest, lie):
        _assert_update_safe(attack)


def test_a_lie_about_the_others_noise_cannot_make_the_target_undercharge(tmp_path):
    """The target is told the honest noise multiplier, two other hospitals a thousandth of it
    (they would add almost no noise). The target counts only peers that signed at least its own
    noise share: its charge is what the three noisy hospitals' sum really carries, and the
    attacker still cannot isolate its update."""
    quiet = replace(HONEST, update_noise_multiplier=1e-3)
    dp = {TARGET: HONEST, H1: HONEST, H2: HONEST, H3: quiet, H4: quiet}
    attack = _dp_round(tmp_path, dp)
    share = HONEST.update_noise_multiplier / math.sqrt(5)
    (charged,) = _charge(tmp_path, 0)
    # The least noise in any sum the target helps unmask: itself and two verified peers.
    protection = math.sqrt(3 * share**2)
    assert charged <= protection + 1e-12
    assert set(ids_in(attack.shares[TARGET]["destinations"])) == {H1, H2}
    _assert_update_safe(attack)


# --- (c) a non-finite value to switch clipping off under masking ---------------------------
def test_a_non_finite_adapter_is_refused_before_anything_is_masked(tmp_path):
    """The coordinator sets the head bias of a class no hospital has to ``-inf``: training
    leaves it alone, the update there is NaN, and a NaN has no quantised code (cast to uint32 it
    becomes an arbitrary one, and the clipping before it was switched off by the NaN norm).
    Every hospital refuses at the mask stage, naming the category; nothing masked leaves and no
    ledger is charged."""
    attack, _ = _attack(tmp_path, dp={n: HONEST for n in NODES})
    model = replace(_model(), num_classes=3)
    state = adapter_state(initial_model(model, 0))
    (bias,) = [k for k, v in state.items() if k.endswith("bias") and v.shape == (3,)]
    state[bias][2] = -math.inf
    attack.arrays = ArrayRecord(state)
    for config in attack.configs.values():
        config["num-classes"] = 3
    _honest_start(attack, _complete(NODES))
    assert attack.vectors == {}  # nothing masked was sent
    assert sorted(attack.errors) == sorted(NODES)
    assert all(e.startswith("mask: non-finite: ") for e in attack.errors.values()), attack.errors
    assert all(_charge(tmp_path, k) == [] for k in range(5))
