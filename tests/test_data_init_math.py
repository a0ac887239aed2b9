"""EVA, CorDA and LoRA-GA math (data_init.eva / corda / lora_ga) against independent numpy
references: full SVDs of the stacked activations, exact reconstructions, brute-force budgets."""
import numpy as np
import pytest

from mindformers_lora_ext.data_init import corda, eva, lora_ga


def _activations(rng, rows, dims, spectrum):
    """Rows with a known covariance spectrum plus an offset mean."""
    basis, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    return (rng.standard_normal((rows, dims)) * np.sqrt(spectrum)) @ basis.T + rng.standard_normal(dims)


def _moments(x, mask):
    weighted = x * mask[:, None]
    return eva.Moments(weighted.T @ x, weighted.sum(0), float(mask.sum()))


def test_eva_components_are_the_full_svd_of_the_masked_centred_stack():
    rng = np.random.default_rng(0)
    x = _activations(rng, 300, 12, np.linspace(10, 0.1, 12))
    mask = (rng.random(300) > 0.3).astype(np.float64)
    found = eva.principal_components(_moments(x, mask), 5)
    kept = x[mask > 0]
    centred = kept - kept.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(found.vectors * vt[:5], axis=1)), 1.0, atol=1e-9)
    np.testing.assert_allclose(found.variances, s[:5] ** 2, rtol=1e-9)
    np.testing.assert_allclose(found.ratios, s[:5] ** 2 / np.sum(s ** 2), rtol=1e-9)
    # a fixed sign: the largest entry of each component is positive
    assert np.all(found.vectors[np.arange(5), np.argmax(np.abs(found.vectors), 1)] > 0)
    whitened = eva.lora_a(found, 3, whiten=True)
    np.testing.assert_allclose(whitened, found.vectors[:3] / np.sqrt(s[:3])[:, None], rtol=1e-9)


def test_eva_allocation_takes_the_largest_ratios_within_the_caps():
    ratios = {"a": np.array([0.5, 0.2, 0.1, 0.05]), "b": np.array([0.3, 0.25, 0.01, 0.0]),
              "c": np.array([0.04, 0.03, 0.02, 0.01])}
    ranks = {"a": 2, "b": 2, "c": 2}
    limits = {"a": 4, "b": 4, "c": 4}
    groups = [["a"], ["b"], ["c"]]
    got = eva.allocate_ranks(ratios, ranks, limits, groups)
    assert got == {"a": 4, "b": 2, "c": 0}  # the 6 largest: .5a .3b .25b .2a .1a .05a
    offered = sorted(((v, n) for n in ratios for v in ratios[n][:limits[n]]), reverse=True)
    budget = sum(ranks.values())
    brute = {n: sum(1 for _, m in offered[:budget] if m == n) for n in ratios}
    assert got == brute
    # caps: a may offer only 1
    capped = eva.allocate_ranks(ratios, ranks, dict(limits, a=1), groups)
    assert capped["a"] == 1 and sum(capped.values()) == budget


def test_eva_equal_inputs_share_components_and_the_leader_holds_the_largest_rank():
    rng = np.random.default_rng(1)
    x = _activations(rng, 100, 8, np.linspace(5, 1, 8))
    ones = np.ones(100)
    same = {"q": _moments(x, ones), "k": _moments(x, ones), "o": _moments(x + 1.0, ones)}
    groups = eva.equal_input_groups(same)
    assert groups == [["q", "k"], ["o"]]
    limits = eva.max_components({"q": 2, "k": 4, "o": 2}, 2.0, groups, {"q": 16, "k": 16, "o": 3})
    assert limits == {"q": 8, "k": 8, "o": 3}
    counts = eva.allocate_ranks({"q": np.array([0.1, 0.1]), "k": np.array([0.9, 0.8]), "o": np.array([0.0])},
                                {"q": 1, "k": 1, "o": 1}, {"q": 2, "k": 2, "o": 1}, groups)
    assert counts["q"] >= counts["k"] and sum(counts.values()) == 3


def test_eva_convergence_and_scaling():
    a = eva.Components(np.eye(3), np.ones(3), np.ones(3) / 3)
    b = eva.Components(np.array([[0.999, 0.0447, 0], [0, 1, 0], [0, 0, -1.0]]), np.ones(3), np.ones(3) / 3)
    assert eva.converged(a, b, 3, 0.99) and not eva.converged(a, b, 3, 0.9995)
    assert not eva.converged(None, b, 1, 0.5) and eva.converged(None, b, 0, 0.5)
    assert eva.scaled_alpha(16.0, 8, 4, True) == 8.0 and eva.scaled_alpha(16.0, 8, 4, False) == 16.0


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_decomposes_w_along_the_covariance(method):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((10, 6))
    x = _activations(rng, 200, 6, np.linspace(4, 0.5, 6))
    cov = x.T @ x / 200
    full = corda.eigens(weight, cov, 6, method)
    np.testing.assert_allclose(full.u @ np.diag(full.s) @ full.v.T, weight, atol=1e-10)  # W = U S V^T
    fixed, _ = corda.damped_covariance(cov)
    _, s_ref, _ = np.linalg.svd(weight @ fixed, full_matrices=False)
    part = corda.eigens(weight, cov, 2, method)
    np.testing.assert_allclose(part.s, s_ref[:2] if method == "ipm" else s_ref[-2:], rtol=1e-10)
    scaling = 2.0
    a, b = corda.factors(part, scaling)
    assert a.shape == (2, 6) and b.shape == (10, 2)
    np.testing.assert_allclose(scaling * b @ a, part.u @ np.diag(part.s) @ part.v.T, atol=1e-10)


def test_corda_damping_follows_peft_rule():
    cov = np.diag([1.0, 1e-14])  # nearly singular: damping kicks in
    fixed, inverse = corda.damped_covariance(cov)
    assert np.linalg.norm(fixed @ inverse - np.eye(2)) < 0.05
    np.testing.assert_allclose(np.diag(fixed) - np.diag(cov), 0.01 * np.mean(np.diag(cov)))


@pytest.mark.parametrize("direction", lora_ga.DIRECTIONS)
@pytest.mark.parametrize("scale", lora_ga.SCALES)
def test_lora_ga_factors_from_the_exact_svd(direction, scale):
    rng = np.random.default_rng(3)
    grad, weight = rng.standard_normal((12, 10)), rng.standard_normal((12, 10))
    rank, scaling, gamma = 3, 2.0, 16
    a, b = lora_ga.factors(grad, weight, rank, scaling, direction, scale, gamma, seed=7)
    u, s, vt = np.linalg.svd(grad, full_matrices=False)  # q = min(4r, 10) = 10: exact
    pick = {"ArB2r": (range(3), range(3, 6)), "A2rBr": (range(3, 6), range(3)),
            "ArBr": (range(1, 6, 2), range(0, 6, 2))}
    if direction == "random":
        chosen = np.random.default_rng(7).permutation(6)[:3]
        a_idx = b_idx = chosen
    else:
        a_idx, b_idx = (list(i) for i in pick[direction])
    ref_a, ref_b = vt[a_idx], u[:, b_idx] * s[b_idx]
    if scale == "stable":
        ref_b = ref_b * 12 ** 0.25 / gamma ** 0.5
    elif scale == "weight_svd":
        ref_b = ref_b * np.linalg.svd(weight, compute_uv=False)[0] / s[b_idx][0]
    elif scale == "gd_scale":
        ref_a, ref_b = ref_a / scaling, ref_b / scaling
    signs_a = np.sign(np.sum(a * ref_a, axis=1))  # singular vectors are defined up to sign
    signs_b = np.sign(np.sum(b * ref_b, axis=0))
    np.testing.assert_allclose(a, ref_a * signs_a[:, None], atol=1e-8)
    np.testing.assert_allclose(b, ref_b * signs_b[None, :], rtol=2e-3 if scale == "weight_svd" else 1e-8,
                               atol=1e-8)


def test_lora_ga_randomized_svd_finds_a_dominant_subspace():
    rng = np.random.default_rng(4)
    u, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    v, _ = np.linalg.qr(rng.standard_normal((150, 150)))
    s = np.concatenate([np.linspace(100, 60, 8), np.full(142, 0.01)])
    grad = (u[:, :150] * s) @ v.T
    a, _ = lora_ga.factors(grad, grad, 4, 1.0, "ArB2r", "unit", 16, seed=1)  # q = 16 < 150: randomized
    np.testing.assert_allclose(np.abs(np.sum(a * v[:, :4].T, axis=1)), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="2 \\* rank <= min"):
        lora_ga.factors(grad[:6, :6], grad[:6, :6], 4, 1.0, "ArB2r", "unit", 16)
