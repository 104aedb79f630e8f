"""micro_lsh: magnification schedule, magnifiers, LSH attention against a loop, export and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fer_core.data.labels import CASME2_CLASSES, SMIC_CLASSES
from fer_core.losses.micro import magnification_loss, micro_classification_loss
from fer_core.models import create_model
from fer_core.models.micro_lsh import LearnedMagnifier, LinearMagnifier, LSHSelfAttention, alpha_schedule
from tests.learning import epochs, fit
from tests.model_checks import check_every_parameter_gets_gradient, check_forward, check_onnx_export

TINY = dict(img_size=16, width=4, stem="small", magnifier_width=4, num_mag_frames=8, head_hidden=16)


def tiny_model(**overrides):
    return create_model("micro_lsh", **{**TINY, **overrides})


def ce_on_random_labels(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = torch.arange(len(outputs["logits"])) % outputs["logits"].shape[1]
    return micro_classification_loss(outputs, {"label": labels})


# ---------------------------------------------------------------- architecture / API


# Separate W_Q/W_K (the described default) hash queries and keys independently; at initialisation a
# sequence often has no pair in a common bucket and then W_Q/W_K/W_V get no gradient at all (see the
# model docstring). The literal configuration therefore uses a hashing seed whose buckets do collide at
# this test's initialisation, which the test asserts first so a failure says why.
@pytest.mark.parametrize(
    "overrides", [dict(magnifier="learned"), dict(magnifier="learned", shared_qk=True), dict(magnifier="linear")],
    ids=["learned", "learned-shared-qk", "linear"],
)
def test_forward_gradient_and_onnx(overrides, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model(lsh_seed=2, **overrides)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        _, weights = model.attention(model.frame_features(model.example_input(4)), return_weights=True)
    assert (weights > 0).sum(-1).max() >= 2, "no query shares its bucket with two keys: attention is dead"
    torch.manual_seed(1)
    check_every_parameter_gets_gradient(model, ce_on_random_labels)
    outs = check_forward(model, batch_size=3)
    torch.testing.assert_close(outs["probabilities"], outs["logits"].softmax(-1))
    assert check_onnx_export(model, tmp_path) <= 1e-4


def test_default_architecture_and_metadata():
    model = create_model("micro_lsh")
    meta = model.metadata
    assert meta.task == "micro" and meta.input.name == "frames"
    assert meta.input.shape == (2, 3, 112, 112) and meta.input.labels == ("onset", "apex")
    assert meta.output_names == ("logits", "probabilities") and meta.primary_output == "logits"
    assert meta.label_names == CASME2_CLASSES and all(s.labels == CASME2_CLASSES for s in meta.outputs)
    assert isinstance(model.magnifier, LearnedMagnifier)
    # ResNet-18: four stages of two basic blocks; d = 512 per frame, attention width = d.
    assert [len(stage) for stage in model.trunk.stages] == [2, 2, 2, 2]
    # Q/K/V width 1024 (the method's 1 x 1024) with separate W_Q and W_K
    assert model.trunk.num_features == 512 and model.attention.attn_dim == 1024 and model.num_features == 1536
    assert model.attention.q_proj.weight.shape == model.attention.k_proj.weight.shape == (1024, 512)
    assert model.attention.hash_norm == "frames" and meta.extra["lsh_shared_qk"] is False
    assert model.attention.n_hashes == meta.extra["lsh_hashes"] == 4
    assert model.attention.n_rounds >= 3 and meta.extra["lsh_buckets"] == 2**model.attention.n_rounds
    assert len(meta.extra["magnification_factors"]) == 32


def test_smic_classes_and_reset_classifier():
    model = tiny_model(num_classes=3)
    assert model.metadata.label_names == SMIC_CLASSES
    model.reset_classifier(5)
    assert model.metadata.label_names == CASME2_CLASSES
    assert [s.shape for s in model.metadata.outputs] == [(5,), (5,)]
    check_forward(model)
    model.reset_classifier(4)
    assert model.metadata.label_names == ("class_0", "class_1", "class_2", "class_3")
    assert model.forward_head(torch.zeros(2, model.num_features), pre_logits=True).shape == (2, 16)


@pytest.mark.parametrize(
    "kwargs", [dict(magnifier="cubic"), dict(img_size=18), dict(num_classes=3, label_names=("a", "b")),
               dict(n_rounds=0), dict(n_rounds=2), dict(hash_norm="layer"), dict(stem="huge")]
)
def test_bad_configuration_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        tiny_model(**kwargs)


def test_wrong_input_shape_raises_value_error():
    with pytest.raises(ValueError):
        tiny_model()(torch.zeros(2, 3, 3, 16, 16))


def test_freeze_magnifier_leaves_it_without_gradient():
    model = tiny_model(freeze_magnifier=True)
    ce_on_random_labels(model.forward_train(model.example_input(4))).backward()
    assert all(p.grad is None for p in model.magnifier.parameters())
    assert all(p.grad is not None for p in model.trunk.parameters())


# ---------------------------------------------------------------- magnification mechanism


def test_alpha_schedule_is_exactly_1_375_to_13_in_steps_of_0_375():
    alphas = alpha_schedule()
    expected = [1.0 + 0.375 * i for i in range(1, 33)]  # 1.375, 1.75, ..., 13 (all exact in binary)
    assert alphas.tolist() == expected
    assert len(alphas) == 32 and alphas[0] == 1.375 and alphas[-1] == 13.0
    model = create_model("micro_lsh", img_size=16, width=4, stem="small", magnifier_width=4)
    assert model.factors.tolist() == [1.0 + a for a in expected]  # f(onset, apex, 1 + alpha_i)
    assert model.metadata.extra["alphas"] == tuple(expected)


def test_linear_magnifier_formula():
    onset, apex = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    factors = torch.tensor([[1.0, 2.5, 14.0], [0.0, 1.0, 3.0]])
    out = LinearMagnifier().magnify(onset, apex, factors)
    assert out.shape == (2, 3, 1, 3, 3)
    for b in range(2):
        for t in range(3):
            for y in range(3):
                for x in range(3):
                    o, a, f = float(onset[b, 0, y, x]), float(apex[b, 0, y, x]), float(factors[b, t])
                    assert math.isclose(float(out[b, t, 0, y, x]), o + f * (a - o), abs_tol=1e-6)
    torch.testing.assert_close(LinearMagnifier().magnify(onset, apex, torch.ones(2)), apex)


def test_model_builds_its_sequence_from_onset_apex_and_the_schedule():
    model = tiny_model(magnifier="linear").eval()
    x = model.example_input(2)
    seq = model.magnified_frames(x)
    assert seq.shape == (2, 8, 1 * 3, 16, 16)[:2] + (3, 16, 16)
    for i, alpha in enumerate(alpha_schedule(8).tolist()):
        torch.testing.assert_close(seq[:, i], x[:, 0] + (1 + alpha) * (x[:, 1] - x[:, 0]))


def test_learned_magnifier_batched_factors_match_one_factor_at_a_time():
    torch.manual_seed(0)
    magnifier = LearnedMagnifier(in_chans=3, width=4)
    onset, apex = torch.rand(2, 3, 8, 12), torch.rand(2, 3, 8, 12)
    factors = torch.tensor([[2.0, 5.0, 14.0], [1.0, 3.0, 7.5]])
    batched = magnifier.magnify(onset, apex, factors)
    assert batched.shape == (2, 3, 3, 8, 12)
    for t in range(3):
        torch.testing.assert_close(batched[:, t], magnifier.magnify(onset, apex, factors[:, t]))
    # The motion representation is a difference of encodings: no motion, no change from the factor.
    still = magnifier.magnify(apex, apex, torch.tensor([[1.0, 9.0], [2.0, 13.0]]))
    torch.testing.assert_close(still[:, 0], still[:, 1])
    with pytest.raises(ValueError):
        magnifier.magnify(onset, apex, torch.ones(3))


def test_magnification_loss():
    pred, target = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert float(magnification_loss({"magnified": pred}, {"magnified": target}, kind="l1")) == 0.5
    assert float(magnification_loss({"magnified": pred}, {"magnified": target})) == 0.25
    with pytest.raises(ValueError):
        magnification_loss({"magnified": pred}, {"magnified": target[:1]})


# ---------------------------------------------------------------- LSH attention mechanism


def loop_bucket(vector: torch.Tensor, hyperplanes: torch.Tensor) -> int:
    code = 0
    for r in range(hyperplanes.shape[1]):
        if sum(float(vector[i]) * float(hyperplanes[i, r]) for i in range(len(vector))) > 0:
            code += 2**r
    return code


def loop_standardise(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each coordinate minus its mean over the frames, over their root-mean-square (by hand)."""
    n, dim = len(vectors), len(vectors[0])
    out = [torch.zeros(dim, dtype=torch.float64) for _ in vectors]
    for i in range(dim):
        mean = sum(float(v[i]) for v in vectors) / n
        rms = math.sqrt(sum((float(v[i]) - mean) ** 2 for v in vectors) / n)
        for t, v in enumerate(vectors):
            out[t][i] = (float(v[i]) - mean) / (rms + 1e-6)
    return out


def loop_lsh_attention(features, w_q, w_k, w_v, hyperplanes, hash_norm="none"):
    """Independent reference: per query, softmax(q.k / sqrt(d)) over keys of its bucket, else 0."""
    features, w_q, w_k, w_v, hyperplanes = (t.detach() for t in (features, w_q, w_k, w_v, hyperplanes))
    batch, steps, _ = features.shape
    d = w_q.shape[0]
    out = torch.zeros(batch, steps, w_v.shape[0], dtype=torch.float64)
    partners_per_row = []
    for b in range(batch):
        q = [w_q.double() @ features[b, t].double() for t in range(steps)]
        k = [w_k.double() @ features[b, t].double() for t in range(steps)]
        v = [w_v.double() @ features[b, t].double() for t in range(steps)]
        hq, hk = (loop_standardise(q), loop_standardise(k)) if hash_norm == "frames" else (q, k)
        q_codes = [loop_bucket(x, hyperplanes.double()) for x in hq]
        k_codes = [loop_bucket(x, hyperplanes.double()) for x in hk]
        for u in range(steps):
            partners = [j for j in range(steps) if k_codes[j] == q_codes[u]]
            partners_per_row.append(len(partners))
            if not partners:
                continue
            scores = [float(q[u] @ k[j]) / math.sqrt(d) for j in partners]
            top = max(scores)
            exps = [math.exp(s - top) for s in scores]
            for j, e in zip(partners, exps):
                out[b, u] += e / sum(exps) * v[j]
    return out, partners_per_row


@pytest.mark.parametrize("hash_norm", ["none", "frames"])
def test_hash_normalisation_matches_the_loop_and_fills_buckets_of_alike_frames(hash_norm):
    torch.manual_seed(4)
    attention = LSHSelfAttention(dim=6, attn_dim=5, n_rounds=3, seed=3, hash_norm=hash_norm)
    # 4 sequences of 12 nearly identical frames: a shared direction plus small per-frame motion
    features = torch.randn(4, 1, 6) * 3 + 0.1 * torch.randn(4, 12, 6)
    with torch.no_grad():
        got = attention(features)
    want, partners = loop_lsh_attention(features, attention.q_proj.weight, attention.k_proj.weight,
                                        attention.v_proj.weight, attention.hyperplanes, hash_norm)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    share = attention.empty_bucket_share(features)
    assert share == pytest.approx(sum(p == 0 for p in partners) / len(partners))
    if hash_norm == "frames":
        assert share < 0.5  # standardised over the frames, queries and keys spread over the buckets
    else:
        # raw hashing: every query of a sequence has one code, every key another
        codes = attention.bucket_codes(attention.q_proj(features))
        assert (codes == codes[:, :1]).all()


def test_several_hashings_attend_pairs_sharing_a_bucket_in_any_of_them():
    torch.manual_seed(5)
    multi = LSHSelfAttention(dim=6, attn_dim=5, n_rounds=3, seed=7, hash_norm="none", n_hashes=3)
    features = torch.randn(2, 9, 6)
    with torch.no_grad():
        q, k = multi.q_proj(features), multi.k_proj(features)
        got = multi.same_bucket(features)
        want = torch.zeros_like(got)
        for planes in [multi.hyperplanes, *multi.extra_hyperplanes]:
            for b in range(2):
                for t in range(9):
                    for u in range(9):
                        if loop_bucket(q[b, t], planes) == loop_bucket(k[b, u], planes):
                            want[b, t, u] = True
    assert torch.equal(got, want)
    single = LSHSelfAttention(dim=6, attn_dim=5, n_rounds=3, seed=7, hash_norm="none")
    torch.testing.assert_close(single.hyperplanes, multi.hyperplanes)  # the first hashing is the seed's, unchanged
    single.load_state_dict({k: v for k, v in multi.state_dict().items() if k != "extra_hyperplanes"}, strict=False)
    assert (got >= single.same_bucket(features)).all()  # more rounds only add partners
    with pytest.raises(ValueError):
        LSHSelfAttention(dim=6, n_hashes=0)


def test_lsh_attention_equals_same_bucket_attention_computed_by_a_loop():
    torch.manual_seed(3)
    attention = LSHSelfAttention(dim=6, attn_dim=5, n_rounds=3, seed=11, hash_norm="none")
    features = torch.randn(3, 10, 6)
    with torch.no_grad():
        got = attention(features)
    want, partners = loop_lsh_attention(
        features, attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight, attention.hyperplanes
    )
    # The case must exercise queries without partners (output 0) and with several partners.
    assert 0 in partners and max(partners) >= 2, partners
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    empty_rows = torch.tensor(partners).view(3, 10) == 0
    assert (got[empty_rows] == 0).all()


def test_shared_qk_attention_matches_the_loop_and_never_leaves_a_query_alone():
    attention = LSHSelfAttention(dim=6, attn_dim=5, n_rounds=4, seed=2, shared_qk=True, hash_norm="none")
    features = torch.randn(2, 9, 6)
    with torch.no_grad():
        got = attention(features)
    w_q = attention.q_proj.weight
    want, partners = loop_lsh_attention(features, w_q, w_q, attention.v_proj.weight, attention.hyperplanes)
    assert min(partners) >= 1 and max(partners) >= 2
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert attention.k_proj is None


def test_lsh_attention_with_one_bucket_is_dense_attention():
    attention = LSHSelfAttention(dim=6, n_rounds=3)  # hash_norm="frames": zero hyperplanes still give 0
    attention.hyperplanes.zero_()  # every projection is 0 -> every vector lands in bucket 0
    features = torch.randn(2, 7, 6)
    with torch.no_grad():
        q, k, v = attention.q_proj(features), attention.k_proj(features), attention.v_proj(features)
        dense = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(6), -1) @ v
        torch.testing.assert_close(attention(features), dense)


def test_bucket_codes_match_signs_and_are_deterministic_per_seed():
    a, b, c = (LSHSelfAttention(8, n_rounds=4, seed=s) for s in (5, 5, 6))
    torch.testing.assert_close(a.hyperplanes, b.hyperplanes, rtol=0, atol=0)
    assert not torch.equal(a.hyperplanes, c.hyperplanes)
    vectors = torch.randn(40, 8)
    codes = a.bucket_codes(vectors)
    assert codes.dtype == torch.int64 and torch.equal(codes, b.bucket_codes(vectors))
    assert int(codes.min()) >= 0 and int(codes.max()) < a.num_buckets == 16
    assert codes.tolist() == [loop_bucket(v, a.hyperplanes) for v in vectors]
    assert not torch.equal(codes, c.bucket_codes(vectors))
    # The hyperplanes are a buffer (saved, moved with the module), not trained.
    assert "hyperplanes" in a.state_dict() and all(p is not a.hyperplanes for p in a.parameters())


# ---------------------------------------------------------------- learning on SynthFACS

LEARN_SIZE = 24  # pixels; magnifier and classifier share it so the trained magnifier plugs in


def _normalised(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) RGB -> float (..., 3, H, W) normalised like the model's input (mean = std = 0.5)."""
    x = torch.from_numpy(images).float().div(255.0).sub(0.5).div(0.5)
    return x.movedim(-1, -3)


def _pair_tensors(pairs) -> tuple[torch.Tensor, ...]:
    # The generator's magnified frame is at AU intensity onset + (1 + alpha)(apex - onset): factor 1 + alpha.
    factors = 1.0 + torch.from_numpy(pairs.alpha)
    return _normalised(pairs.onset), _normalised(pairs.apex), _normalised(pairs.magnified), factors


@pytest.fixture(scope="module")
def trained_magnifier() -> LearnedMagnifier:
    """A LearnedMagnifier trained on 400 generated pairs (16 subjects) for 200 Adam steps."""
    from fer_core.data.synthfacs import SynthFACS

    torch.set_num_threads(1)
    onset, apex, magnified, factors = _pair_tensors(
        SynthFACS(seed=0, image_size=LEARN_SIZE).magnified_pairs(400, num_subjects=16)
    )
    torch.manual_seed(0)
    magnifier = LearnedMagnifier(in_chans=3, width=8)
    optimizer = torch.optim.Adam(magnifier.parameters(), lr=4e-3)
    picks = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(onset), (32,), generator=picks)
        pred = magnifier.magnify(onset[idx], apex[idx], factors[idx])
        loss = magnification_loss({"magnified": pred}, {"magnified": magnified[idx]})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return magnifier.eval()


@pytest.mark.slow
def test_learned_magnifier_beats_identity_and_linear_on_held_out_pairs(trained_magnifier):
    from fer_core.data.synthfacs import SynthFACS

    held_out = SynthFACS(seed=1, image_size=LEARN_SIZE).magnified_pairs(200, num_subjects=8, first_subject=100)
    onset, apex, magnified, factors = _pair_tensors(held_out)
    with torch.no_grad():
        linear = LinearMagnifier().magnify(onset, apex, factors)
        mse = {  # on the [0, 1] pixel scale (normalised values span 2)
            "identity": float((apex - magnified).pow(2).mean()) / 4,
            "linear": float((linear - magnified).pow(2).mean()) / 4,
            "linear_clipped": float((linear.clamp(-1, 1) - magnified).pow(2).mean()) / 4,
            "learned": float((trained_magnifier.magnify(onset, apex, factors) - magnified).pow(2).mean()) / 4,
        }
    print("held-out magnification MSE:", {k: f"{v:.2e}" for k, v in mse.items()})
    # Thresholds: at least 10 % below copying the apex, and below the (clipped) linear baseline.
    assert mse["learned"] < 0.9 * mse["identity"], mse
    assert mse["learned"] < mse["linear_clipped"] < mse["linear"], mse


@pytest.mark.slow
def test_micro_lsh_learns_casme2_classes_on_held_out_subjects(trained_magnifier):
    """Onset/apex of generated CASME II-scheme micro-clips; test subjects never seen in training."""
    from fer_core.data.synthfacs import SynthFACS

    torch.set_num_threads(1)

    def onset_apex(clips) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.arange(len(clips))
        frames = np.stack([clips.clips[rows, clips.onset], clips.clips[rows, clips.apex]], axis=1)
        return _normalised(frames), torch.from_numpy(clips.labels)

    x_train, y_train = onset_apex(SynthFACS(seed=0, image_size=LEARN_SIZE).micro_clips(400, "casme2", num_frames=3))
    x_test, y_test = onset_apex(
        SynthFACS(seed=1, image_size=LEARN_SIZE).micro_clips(200, "casme2", num_frames=3, first_subject=100)
    )
    model = create_model(
        "micro_lsh", img_size=LEARN_SIZE, width=8, stem="imagenet", magnifier_width=8,
        num_mag_frames=8, head_hidden=32, attn_dim=64,  # Q/K/V scaled down with the widths (method: 1024)
    )
    model.magnifier.load_state_dict(trained_magnifier.state_dict())  # then fine-tuned end to end
    losses = fit(model, micro_classification_loss, epochs(x_train, {"label": y_train}, 32), steps=60, lr=3e-3)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test)[0].argmax(1) == y_test).float().mean())
        _, weights = model.attention(model.frame_features(x_test), return_weights=True)
    chance = 1 / len(CASME2_CLASSES)
    print(f"micro_lsh held-out-subject accuracy {accuracy:.3f} (chance {chance:.2f}); loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}; LSH queries without a partner: {float((weights.sum(-1) == 0).float().mean()):.0%}")
    assert accuracy >= 2 * chance, accuracy  # threshold: twice chance (0.40)
