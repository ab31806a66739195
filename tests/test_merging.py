import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.merging import (
    MERGE_METHODS,
    MergeInputError,
    dare,
    merge_safetensors,
    merge_state_dicts,
    register_merge,
    sce,
    task_arithmetic,
    ties,
    varm,
)

D = torch.float64


def t(*v):
    return torch.tensor(v, dtype=D)


@pytest.fixture
def fused_merging(monkeypatch):
    """models.merging with its compiled loops switched on (skips where numba is not installed)."""
    import models.merging as merging

    if not merging.K.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(merging, "KERNELS", True)
    return merging


def test_registry_names():
    assert {"task_arithmetic", "ties", "dare", "sce", "varm"} <= set(MERGE_METHODS)


def test_task_arithmetic_hand_values():
    # deltas [1,0] and [0,2]; base + 0.5*[1,2] = [1.5, 3]
    out = task_arithmetic(t(1, 2), [t(2, 2), t(1, 4)], lam=0.5)
    assert torch.allclose(out, t(1.5, 3.0))


def test_ties_uniform_weights_hand_values():
    # trimmed (k=2): m1 [3,0,2,0], m2 [-2,0,0,-4]; sum [1,0,2,-4] -> sign [+,+,+,-]
    # agreeing: pos0 m1 only ->3, pos1 none (divisor->1) ->0, pos2 m1 ->2, pos3 m2 ->-4
    out = ties(t(0, 0, 0, 0), [t(3, -1, 2, 0.5), t(-2, 1, 1, -4)], density=0.5)
    assert torch.allclose(out, t(3, 0, 2, -4))


def test_ties_weights_before_sign_election():
    # weights [1,2]: weighted m2 = [-4,0,0,-8]; sum [-1,0,2,-8] -> sign [-,+,+,-]
    # pos0: m2 only: -4/2=-2; pos1: 0; pos2: m1: 2/1=2; pos3: m2: -8/2=-4
    out = ties(t(0, 0, 0, 0), [t(3, -1, 2, 0.5), t(-2, 1, 1, -4)], density=0.5, weights=[1, 2])
    assert torch.allclose(out, t(-2, 0, 2, -4))


def test_ties_keeps_at_least_one_element():
    # int(0.1 * 4) = 0, but density > 0 keeps one element: the largest magnitude (index 2); density 0 keeps none
    assert torch.equal(ties(t(0, 0, 0, 0), [t(1, -2, -3, 0.5)], density=0.1), t(0, 0, -3, 0))
    assert torch.equal(ties(t(0, 0, 0, 0), [t(1, -2, -3, 0.5)], density=0.0), t(0, 0, 0, 0))


def test_ties_stable_tie_break_keeps_lowest_index():
    # all magnitudes equal, k=2: positions 0 and 1 kept
    out = ties(t(0, 0, 0, 0), [t(1, 1, 1, 1)], density=0.5)
    assert torch.allclose(out, t(1, 1, 0, 0))


def test_varm_hand_values():
    # mean sq: d1=[1,1] -> 1, d2=[2,0] -> 2; w=[1/3,2/3]; [1/3+4/3, 1/3]
    out = varm(t(0, 0), [t(1, 1), t(2, 0)])
    assert torch.allclose(out, t(5 / 3, 1 / 3))


def test_sce_hand_values():
    # variance (torch.var, population): [1,4,0,1], 3 non-zero -> k = int(0.5*3) = 1: pos1 only
    # masked d1=[0,2,0,0], d2=[0,-2,0,0]; energies 1, 1 -> w = 1/2, 1/2
    # summed sign at pos1: 0 -> +; only d1 agrees: (1/2*2)/(1/2) = 2
    out = sce(t(0, 0, 0, 0), [t(1, 2, 0, -1), t(3, -2, 0, 1)], select_topk=0.5)
    assert torch.allclose(out, t(0, 2, 0, 0))
    # the same deltas around a pivot of 5: masked, unselected positions stay at the pivot
    models = [t(6, 7, 5, 4), t(8, 3, 5, 6)]
    assert torch.allclose(sce(t(5, 5, 5, 5), models, select_topk=0.5), t(5, 7, 5, 5))
    # unmasked final sum: same weights (from the masked deltas), raw deltas everywhere: pos0 both agree
    # (1+3)/2 = 2; pos1 sum 0 -> +, d1 = 2; pos2 all 0 -> pivot; pos3 sum 0 -> +, only d2 = +1
    out2 = sce(t(5, 5, 5, 5), models, select_topk=0.5, masked_final_sum=False)
    assert torch.allclose(out2, t(7, 7, 5, 6))


def test_sce_k_counts_nonzero_variances_only():
    # deltas d1=[1,2,5,5], d2=[3,-2,5,5]: variances [1,4,0,0]. k = int(0.5 * 2 non-zero) = 1 (over all four
    # positions it would be 2): pos1 only. Masked d1=[0,2,0,0], d2=[0,-2,0,0] -> as above: [0,2,0,0]
    out = sce(t(0, 0, 0, 0), [t(1, 2, 5, 5), t(3, -2, 5, 5)], select_topk=0.5)
    assert torch.equal(out, t(0, 2, 0, 0))
    # select_topk=1 selects every position, zero variance included (mergekit skips the mask): weights from
    # the raw deltas e1 = 55/4, e2 = 63/4; pos0 both agree; pos1 sum 0 -> +, d1 = 2 alone; pos2, 3 both 5
    e1, e2 = 55 / 4, 63 / 4
    w1, w2 = e1 / (e1 + e2), e2 / (e1 + e2)
    full = sce(t(0, 0, 0, 0), [t(1, 2, 5, 5), t(3, -2, 5, 5)], select_topk=1.0)
    assert torch.allclose(full, t(w1 * 1 + w2 * 3, 2, 5, 5))


def test_sce_single_model_returns_the_pivot():
    # one model: every variance is 0, so nothing is selected (mergekit): the pivot, whatever the delta
    pivot, model = t(1, 2, 3), t(4, -5, 6)
    assert torch.equal(sce(pivot, [model], select_topk=0.5), pivot)
    assert torch.equal(sce(pivot, [model], select_topk=1.0), model)  # every position selected: the model


def test_sce_selection_uses_torch_var_and_stable_ties():
    # variances chosen so that a hand-written population variance and torch.var may round differently;
    # the mask must be the stable top-k of torch.var(unbiased=False) (checked against the formula below)
    g = torch.Generator().manual_seed(3)
    pivot = torch.zeros(50_000)
    models = [torch.randn(50_000, generator=g) * 1e-3 for _ in range(3)]
    models[0][:100] = models[1][:100] = models[2][:100] = 0.5  # 100 zero variances
    models[0][100:300], models[1][100:300], models[2][100:300] = 1.0, 2.0, 3.0  # 200 tied variances at the top
    expect = _reference_sce(pivot, models, 0.003)
    assert torch.equal(sce(pivot, models, select_topk=0.003), expect)
    # k = int(0.003 * 49_900) = 149 of the 200 tied top variances: the lowest flat indices 100..248
    assert torch.equal(expect[100:249] != 0, torch.ones(149, dtype=torch.bool)) and not expect[249:300].any()


def test_sce_uniform_fallback_for_tiny_energy():
    # every position selected; energies ~1e-14 -> uniform weights: pos0 (1e-7+3e-7)/2 = 2e-7
    out = sce(t(0, 0), [t(1e-7, 0), t(3e-7, 0)], select_topk=1.0)
    assert torch.allclose(out, t(2e-7, 0), atol=1e-20)


def test_dare_keeps_fraction_and_rescales():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(100_000, dtype=D)
    out = dare(base, [torch.ones_like(base)], density=0.25, generator=g)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.25) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 4.0))
    assert abs(out.mean().item() - 1.0) < 0.04  # unbiased in expectation


def test_bad_input_raises():
    with pytest.raises(ValueError):
        merge_state_dicts("nope", {"a": t(1)}, [{"a": t(1)}])
    with pytest.raises(ValueError):
        ties(t(0, 0), [t(1, 1)], density=1.5)
    with pytest.raises(ValueError):
        task_arithmetic(t(0, 0), [t(1, 1)], weights=[1, 2])


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {"lam": 0.3}), ("ties", {"density": 0.3}),
                                       ("sce", {"select_topk": 0.2}), ("varm", {})])
def test_streaming_equals_in_memory(tmp_path, method, kw):
    g = torch.Generator().manual_seed(1)
    names = {"w": (6, 5), "b": (5,), "emb": (7, 3)}
    base = {k: torch.randn(s, generator=g) for k, s in names.items()}
    sds = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    out = tmp_path / "out" / "merged.safetensors"
    merge_safetensors(method, str(tmp_path / "base.safetensors"), paths, str(out), **kw)
    streamed = load_file(out)
    mem = merge_state_dicts(method, base, sds, **kw)
    assert set(streamed) == set(mem)
    for k in mem:
        assert torch.equal(streamed[k], mem[k])


def test_topk_mask_selection_equals_stable_sort_definition():
    # topk_mask selects by threshold (kthvalue) instead of sorting: the kept elements must be those of a
    # stable descending sort of |x| (lowest flat index wins a tie at the cut-off), ties included
    from models.merging import topk_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        x = torch.randint(-3, 4, (n,), generator=g).to(D) if trial % 2 else torch.randn(n, generator=g, dtype=D)
        for density in (0.0, 0.1, 0.34, 0.5, 0.9, 1.0):
            k = int(density * n)
            expect = torch.zeros(n, dtype=torch.bool)
            expect[torch.sort(x.abs(), descending=True, stable=True).indices[:k]] = True
            got = topk_mask(x.view(-1, 1), density).view(-1)
            assert torch.equal(got, expect) and int(got.sum()) == k


def test_merge_state_dicts_exclude_keeps_the_base_value():
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    sds = [{"w": torch.tensor([2.0, 2.0]), "b": torch.tensor([1.5])},
           {"w": torch.tensor([1.0, 4.0]), "b": torch.tensor([3.5])}]
    out = merge_state_dicts("task_arithmetic", base, sds, lam=0.5, exclude=["b"])
    assert torch.allclose(out["w"], torch.tensor([1.5, 3.0]))  # 1 + 0.5 * (1 + 0), 2 + 0.5 * (0 + 2)
    assert torch.equal(out["b"], base["b"]) and out["b"] is not base["b"]  # a copy, never merged
    # an excluded name need not exist in the merged models
    assert torch.equal(merge_state_dicts("ties", base, [{"w": s["w"]} for s in sds], exclude=["b"])["b"], base["b"])


# ---- the chunked methods against the plain whole-tensor formulas, bit for bit ----------------------------

def _stacked(base, models):
    return torch.stack([m.float() - base.float() for m in models])


def _stable_topk(x, k):
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[torch.sort(x.reshape(-1), descending=True, stable=True).indices[:k]] = True
    return mask.view(x.shape)


def _wcol(w, n, like):
    return torch.tensor(w if w is not None else [1.0] * n).view(-1, *[1] * (like.dim() - 1))


def _reference_task_arithmetic(base, models, weights, lam):
    d = _stacked(base, models)
    return base + lam * (_wcol(weights, len(models), d) * d).sum(dim=0)


def _reference_ties(base, models, density, weights):
    d = _stacked(base, models)
    k = max(int(density * base.numel()), 1)
    trimmed = torch.stack([x * _stable_topk(x.abs(), k) for x in d])
    weighted = trimmed * _wcol(weights, len(models), d)
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == sign
    divisor = (_wcol(weights, len(models), d) * agree).sum(0)
    divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return base + (weighted * agree).sum(0) / divisor


def _splitmix64(seed, k):
    """Output k (1-based) of SplitMix64 seeded with `seed`, in Python integers (Steele, Lea & Flood 2014)."""
    m = (1 << 64) - 1
    z = (seed + k * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_dare_uniforms_are_splitmix64():
    from models.merge_kernels import uniforms

    assert _splitmix64(0, 1) == 0xE220A8397B1DCDAF  # the generator's published first output for seed 0
    seed = 0xDEADBEEF12345678
    got = uniforms(seed, 1000, 5)
    assert got.dtype.name == "float32"
    assert [float(u) for u in got] == [(_splitmix64(seed, 1001 + i) >> 40) / 2 ** 24 for i in range(5)]


def _reference_dare(base, models, density, weights, seed):
    from models.merge_kernels import uniforms

    d = _stacked(base, models)
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (len(models),), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.int64).numpy().view("uint64")
    u = torch.stack([torch.from_numpy(uniforms(int(s), 0, base.numel())) for s in seeds]).view(d.shape)
    keep = u < density
    return base + ((_wcol(weights, len(models), d) * (d * keep / density)).sum(0))


def _reference_varm(pivot, models):
    d = _stacked(pivot, models)
    energy = (d.double() ** 2).reshape(len(models), -1).mean(dim=1).to(pivot.dtype)
    w = (energy / energy.sum()).view(-1, *[1] * pivot.dim())
    return pivot + (w * d).sum(0)


def _reference_sce(pivot, models, select_topk, masked_final_sum=True):
    d = _stacked(pivot, models)
    var = torch.var(d, dim=0, unbiased=False)
    mask = _stable_topk(var, int(select_topk * int(torch.count_nonzero(var))))
    masked = d * mask
    energy = (masked.double() ** 2).reshape(len(models), -1).mean(dim=1).to(pivot.dtype)
    if float(energy.sum()) < 1e-6:
        energy = torch.ones_like(energy)
    w = (energy / energy.sum()).view(-1, *[1] * pivot.dim())
    final = masked if masked_final_sum else d
    erase = torch.sign(final) == torch.where(final.sum(0) >= 0, 1.0, -1.0)
    den = (w * erase).sum(0)
    return pivot + (w * final * erase).sum(0) / torch.where(den.abs() < 1e-12, torch.ones_like(den), den)


def test_sum0_is_torchs_stacked_sum_and_in_order_only_up_to_max_models():
    # the fused loops add the models in order; that is torch's stacked sum only up to K.MAX_MODELS rows (with 5
    # rows torch 2.13 adds some columns in another order), so more models go through _sum0's torch.stack path
    import models.merging as merging

    g = torch.Generator().manual_seed(3)
    differs = set()
    for n in range(1, 9):
        for numel in (1, 7, 33, 100, 1001):
            parts = [torch.randint(-3, 4, (numel,), generator=g).float() * (0.1 + j / 7) for j in range(n)]
            want = torch.stack(parts).sum(0)
            assert torch.equal(merging._sum0([p.clone() for p in parts]), want)
            in_order = parts[0].clone()
            for p in parts[1:]:
                in_order = in_order + p
            if not torch.equal(in_order, want):
                differs.add(n)
    assert min(differs) == merging.K.MAX_MODELS + 1


@pytest.mark.parametrize("n,numel,ints", [(1, 70_001, False), (3, 200_003, True), (3, 150_000, False),
                                          (4, 40_000, False), (5, 50_000, True), (8, 90_000, True),
                                          (2, 5_000, True)])
@pytest.mark.parametrize("kernels", [True, False], ids=["fused", "torch"])
def test_methods_equal_whole_tensor_formulas(n, numel, ints, kernels, monkeypatch):
    # several chunks, the sampled selection path (numel above the direct-selection size), ties at the top-k
    # cut-off (integer deltas), every model count the fused loops spell out (1-4), 5 and 8 models (beyond the
    # in-order sum: the torch path's stacked sums); bit-identical results, from the fused numba loops and from
    # the torch ops
    import models.merging as merging

    if kernels and not merging.K.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(merging, "KERNELS", kernels)
    g = torch.Generator().manual_seed(numel + n)
    base = torch.randn(1, numel, generator=g)
    if ints:
        models = [base + torch.randint(-3, 4, (1, numel), generator=g).float() for _ in range(n)]
    else:
        models = [base + 1e-3 * torch.randn(1, numel, generator=g) for _ in range(n)]
    w = [0.5 + j / 4 for j in range(n)]
    assert torch.equal(task_arithmetic(base, models, weights=w, lam=0.7),
                       _reference_task_arithmetic(base, models, w, 0.7))
    assert torch.equal(ties(base, models, density=0.3, weights=w), _reference_ties(base, models, 0.3, w))
    assert torch.equal(ties(base, models, density=0.3), _reference_ties(base, models, 0.3, None))
    assert torch.equal(dare(base, models, density=0.4, weights=w, generator=torch.Generator().manual_seed(5)),
                       _reference_dare(base, models, 0.4, w, 5))
    assert torch.equal(varm(base, models), _reference_varm(base, models))
    for masked in (True, False):
        assert torch.equal(sce(base, models, select_topk=0.2, masked_final_sum=masked),
                           _reference_sce(base, models, 0.2, masked))


# ---- files: streaming, bad inputs, atomic output ---------------------------------------------------------

def _write_models(tmp_path, n=2, extra=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    base = {"a.w": torch.randn(4, 3, generator=g).to(dtype), "b.w": torch.randn(5, generator=g).to(dtype),
            "c.w": torch.randn(2, 2, generator=g).to(dtype)}
    sds = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
           for _ in range(n)]
    if extra:
        extra(base, sds)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, sd in enumerate(sds):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    return str(tmp_path / "base.safetensors"), paths, str(tmp_path / "out" / "merged.safetensors")


def _assert_nothing_written(out):
    d = os.path.dirname(out)
    assert not os.path.exists(out)
    assert not os.path.isdir(d) or not [f for f in os.listdir(d) if f.endswith(".tmp")]


def _fails(base, paths, out, match, **kw):
    with pytest.raises(MergeInputError, match=match) as err:
        merge_safetensors("task_arithmetic", base, paths, out, **kw)
    _assert_nothing_written(out)
    return str(err.value)


def test_tensor_missing_from_base_is_an_error_or_passed_through(tmp_path):
    def extra(base, sds):
        for sd in sds:
            sd["head.w"] = torch.ones(3)
    base, paths, out = _write_models(tmp_path, extra=extra)
    msg = _fails(base, paths, out, "'head.w'")
    assert base in msg and "missing from the base" in msg
    merge_safetensors("task_arithmetic", base, paths, out, passthrough=["head.*"])
    assert set(load_file(out)) == {"a.w", "b.w", "c.w"}


def test_extra_tensor_in_one_model_is_an_error(tmp_path):
    base, paths, out = _write_models(tmp_path, extra=lambda base, sds: sds[1].update(x=torch.ones(2)))
    msg = _fails(base, paths, out, "'x'")
    assert paths[1] in msg
    merge_safetensors("task_arithmetic", base, paths, out, passthrough=["x"])  # told to ignore it
    assert set(load_file(out)) == {"a.w", "b.w", "c.w"}


def test_tensor_missing_from_a_model_is_an_error_unless_passed_through(tmp_path):
    base, paths, out = _write_models(tmp_path, extra=lambda base, sds: sds[0].pop("b.w"))
    assert paths[0] in _fails(base, paths, out, "'b.w'")
    merge_safetensors("task_arithmetic", base, paths, out, passthrough=["b.w"], lam=1.0)
    got, base_sd = load_file(out), load_file(base)
    assert torch.equal(got["b.w"], base_sd["b.w"])  # copied from the base, not merged
    assert not torch.equal(got["a.w"], base_sd["a.w"])


def test_shape_mismatch_is_an_error(tmp_path):
    base, paths, out = _write_models(tmp_path, extra=lambda base, sds: sds[1].update({"c.w": torch.ones(4)}))
    msg = _fails(base, paths, out, "'c.w'")
    assert paths[1] in msg and "[4]" in msg and "[2, 2]" in msg


@pytest.mark.parametrize("where,value", [("model", float("nan")), ("model", float("inf")),
                                         ("base", float("-inf"))])
def test_non_finite_value_aborts_the_merge(tmp_path, where, value):
    def extra(base, sds):  # "c.w" is written last: the merge is under way when the value is read
        (base if where == "base" else sds[1])["c.w"][1, 0] = value
    base, paths, out = _write_models(tmp_path, extra=extra)
    msg = _fails(base, paths, out, "'c.w'")
    assert (base if where == "base" else paths[1]) in msg and "non-finite" in msg


FIVE = [("task_arithmetic", {}), ("ties", {"density": 0.3}), ("dare", {"density": 0.5}), ("sce", {}), ("varm", {})]


def _big_models(tmp_path, extra=None):
    """_write_models plus "d.w", 200 x 200: past the direct selection, so TIES and SCE take their sampled,
    fused paths (the inputs' finiteness is then proved by the merge's own loops, not by a pass of its own)."""
    def add(base, sds):
        g = torch.Generator().manual_seed(1)
        base["d.w"] = torch.randn(200, 200, generator=g)
        for sd in sds:
            sd["d.w"] = base["d.w"] + 0.01 * torch.randn(200, 200, generator=g)
        if extra:
            extra(base, sds)
    return _write_models(tmp_path, n=3, extra=add)


@pytest.mark.parametrize("method,kw", FIVE)
@pytest.mark.parametrize("where,value", [("model", float("nan")), ("model", float("inf")),
                                         ("base", float("-inf")), ("base", float("nan"))])
def test_non_finite_value_in_a_big_tensor_is_an_error_for_every_method(tmp_path, method, kw, where, value):
    def extra(base, sds):
        (base if where == "base" else sds[2])["d.w"][117, 3] = value
    base, paths, out = _big_models(tmp_path, extra)
    with pytest.raises(MergeInputError, match="'d.w'") as err:
        merge_safetensors(method, base, paths, out, **kw)
    msg = str(err.value)
    assert (base if where == "base" else paths[2]) in msg and "has 1 non-finite value" in msg
    _assert_nothing_written(out)


def test_a_method_merging_other_tensors_does_not_vouch_for_the_inputs(tmp_path):
    """A registered method that merges only the first model through task_arithmetic: its loops see that
    model's deltas only, so the NaN in the second model must still be found by merge_safetensors' own check."""
    @register_merge("first_model_only")
    def first_model_only(base, models):
        return task_arithmetic(base, models[:1])

    def extra(base, sds):
        sds[1]["d.w"][3, 3] = float("nan")
    base, paths, out = _big_models(tmp_path, extra)
    try:
        with pytest.raises(MergeInputError, match="'d.w'") as err:
            merge_safetensors("first_model_only", base, paths, out)
    finally:
        MERGE_METHODS.pop("first_model_only")
    assert paths[1] in str(err.value)
    _assert_nothing_written(out)


def test_a_delta_that_overflows_is_not_mistaken_for_a_bad_input(tmp_path):
    """Finite inputs whose difference overflows float32 (3e38 - (-3e38) = inf): the loops see a non-finite
    delta, the inputs are then checked, found finite, and the merge goes on as the formula says."""
    def extra(base, sds):
        base["d.w"][5, 5] = -3e38
        sds[0]["d.w"][5, 5] = 3e38
    base, paths, out = _big_models(tmp_path, extra)
    merge_safetensors("task_arithmetic", base, paths, out, lam=1.0)
    got, want = load_file(out), merge_state_dicts("task_arithmetic", load_file(base),
                                                  [load_file(p) for p in paths], lam=1.0)
    assert torch.isinf(got["d.w"][5, 5]) and torch.equal(got["d.w"], want["d.w"])


@pytest.mark.parametrize("kernels", [True, False])
def test_the_finiteness_pass_is_skipped_only_where_the_loops_proved_it(tmp_path, monkeypatch, kernels):
    """With the fused loops every merged tensor's inputs are proved finite by the merge's own pass, so the
    separate check runs only for tensors copied from the base; with the torch path it runs for all inputs."""
    import models.merging as merging

    monkeypatch.setattr(merging, "KERNELS", kernels)
    checked = []
    real = merging._check_finite
    monkeypatch.setattr(merging, "_check_finite", lambda t, name, path: (checked.append(name), real(t, name, path)))
    base, paths, out = _big_models(tmp_path)
    for method, kw in FIVE:
        checked.clear()
        merge_safetensors(method, base, paths, out, passthrough=["b.w"], **kw)
        want = ["b.w"] if kernels else ["b.w"] + [n for n in ("a.w", "c.w", "d.w") for _ in range(4)]
        assert sorted(checked) == sorted(want), method


def test_truncated_file_is_an_error(tmp_path):
    base, paths, out = _write_models(tmp_path)
    size = os.path.getsize(paths[1])
    with open(paths[1], "r+b") as f:
        f.truncate(size - 5)
    msg = _fails(base, paths, out, "truncated")
    assert paths[1] in msg and "'" in msg  # names the tensor that runs past the end


@pytest.mark.parametrize("content", [b"", b"hello", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
                                     struct.pack("<Q", 2) + b"[]", b"PK\x03\x04" + bytes(100)])
def test_foreign_file_is_an_error(tmp_path, content):
    base, paths, out = _write_models(tmp_path)
    with open(paths[0], "wb") as f:
        f.write(content)
    msg = _fails(base, paths, out, "not a safetensors file")
    assert paths[0] in msg


def test_interrupted_merge_leaves_no_file_and_keeps_an_existing_output(tmp_path):
    base, paths, out = _write_models(tmp_path)
    os.makedirs(os.path.dirname(out))
    with open(out, "wb") as f:
        f.write(b"previous")
    calls = []

    @register_merge("_test_interrupting")
    def interrupting(b, models):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return b.clone()

    try:
        with pytest.raises(KeyboardInterrupt):
            merge_safetensors("_test_interrupting", base, paths, out)
    finally:
        MERGE_METHODS.pop("_test_interrupting")
    assert len(calls) == 3
    assert open(out, "rb").read() == b"previous"
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]


def test_output_has_normal_permissions(tmp_path):
    base, paths, out = _write_models(tmp_path)
    old = os.umask(0o022)
    try:
        merge_safetensors("ties", base, paths, out, density=0.5)
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_streamed_file_keeps_dtypes_metadata_and_values(tmp_path, dtype):
    base, paths, out = _write_models(tmp_path, n=3, dtype=dtype)
    save_file(load_file(base), base, metadata={"format": "pt", "note": "kept"})
    merge_safetensors("sce", base, paths, out, select_topk=0.5)
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
    got = load_file(out)
    expect = merge_state_dicts("sce", load_file(base), [load_file(p) for p in paths], select_topk=0.5)
    assert {k: v.dtype for k, v in got.items()} == {k: dtype for k in expect}
    for k in expect:
        assert torch.equal(got[k], expect[k])


def test_selection_over_nan_is_a_clear_error():
    # a tensor big enough for the sampled selection; NaN inputs are rejected by merge_safetensors before a
    # merge, and the per-tensor functions say what is wrong instead of returning a silently wrong mask
    base = torch.zeros(100_000)
    model = torch.linspace(-1, 1, 100_000)
    model[7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ties(base, [model], density=0.3)


def test_sigint_during_a_merge_leaves_no_file(tmp_path):
    # a real Ctrl-C to a merging process: the child announces the merge is under way (a temporary file
    # exists), the parent sends SIGINT, the child exits by KeyboardInterrupt and leaves nothing behind
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    base, paths, out = _write_models(tmp_path)
    script = f"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, even if this test runs
# in a background job, whose children inherit SIGINT ignored
sys.path.insert(0, {str(ROOT)!r})
from models.merging import merge_safetensors, register_merge

@register_merge("slow")
def slow(b, models):
    print("merging", flush=True)
    time.sleep(30)
    return b.clone()

merge_safetensors("slow", {base!r}, {paths!r}, {out!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "merging"
        assert [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]  # the merge is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    _assert_nothing_written(out)


def test_unknown_keyword_fails_before_writing(tmp_path):
    base, paths, out = _write_models(tmp_path)
    with pytest.raises(ValueError, match="densty"):
        merge_safetensors("ties", base, paths, out, densty=0.3)
    _assert_nothing_written(out)


def test_ties_per_model_selection_equals_the_fused_one_and_the_formula(monkeypatch, fused_merging):
    # the per-model selection runs when a sample cannot bracket one model's cut-off (many equal values); here it
    # is forced on float deltas, where the fused pass for all models would otherwise run: the same bits
    merging = fused_merging
    monkeypatch.setattr(merging, "_WHOLE_TENSOR", 0)  # the chunked path (the whole-tensor call: tested below)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200_003, generator=g)
    models = [base + 1e-3 * torch.randn(200_003, generator=g) for _ in range(3)]
    fused = ties(base, models, density=0.3)
    monkeypatch.setattr(merging, "_ties_cuts_fused", lambda *a: None)
    assert torch.equal(ties(base, models, density=0.3), fused)
    assert torch.equal(fused, _reference_ties(base, models, 0.3, None))


def test_ties_fused_selection_resolves_ties_at_the_cut_off_from_the_scan(monkeypatch, fused_merging):
    # deltas on a grid of 0.01: hundreds of values tie at each model's cut-off, yet the sample's bracket spans
    # several grid values, so the fused pass runs; the lowest flat indices among the tied are kept, found from
    # the indices the scan collected (no second pass: the per-chunk search is never called)
    merging = fused_merging
    monkeypatch.setattr(merging, "_WHOLE_TENSOR", 0)  # the chunked path (the whole-tensor call: tested below)
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(200_003)
    models = [torch.round(torch.randn(200_003, generator=g) * 100) / 100 for _ in range(3)]
    fused = []
    real_fused = merging._ties_cuts_fused
    monkeypatch.setattr(merging, "_ties_cuts_fused", lambda *a: fused.append(real_fused(*a)) or fused[-1])

    def no_search(*a):
        raise AssertionError("searched the tensor again for the tied values")

    monkeypatch.setattr(merging, "_find_abs_delta_equal", no_search)
    out = ties(base, models, density=0.3)
    assert fused and fused[0] is not None
    for (thr, cut), m in zip(fused[0], models):
        assert 0 < cut < m.numel() and int((m.abs() == thr).sum()) > 100  # a tie straddles every cut-off
    assert torch.equal(out, _reference_ties(base, models, 0.3, None))


def _record_whole_ties(monkeypatch, merging):
    """Record the status of every K.ties_tensor_f32 call (0 done, 1 handed back, 2 NaN)."""
    statuses = []
    real = merging.K.ties_tensor_f32

    def recording(*a):
        r = real(*a)
        statuses.append(int(r[0]))
        return r

    monkeypatch.setattr(merging.K, "ties_tensor_f32", recording)
    return statuses


@pytest.mark.parametrize("case", ["noise", "grid", "weighted", "sparse_k", "dense_k", "one_model", "four_models"])
def test_ties_whole_tensor_call_equals_the_chunked_path_and_the_formula(case, monkeypatch, fused_merging):
    # a float32 tensor up to _WHOLE_TENSOR elements is merged by one compiled call (sample, brackets, scan,
    # selection, final loop); it must give the bits of the chunked path (forced with _WHOLE_TENSOR = 0) and of
    # the formula, ties at the cut-offs included (the grid case: hundreds of equal |d| straddle every cut-off)
    merging = fused_merging
    g = torch.Generator().manual_seed(11)
    n = 150_001
    n_models = {"one_model": 1, "four_models": 4}.get(case, 3)
    density = {"sparse_k": 0.002, "dense_k": 0.97}.get(case, 0.3)
    weights = [0.4, 1.3, 0.9] if case == "weighted" else None
    base = torch.randn(n, generator=g) * 0.02
    if case == "grid":
        base = torch.zeros(n)
        models = [torch.round(torch.randn(n, generator=g) * 100) / 100 for _ in range(n_models)]
    else:
        models = [base + 1e-3 * torch.randn(n, generator=g) for _ in range(n_models)]
    statuses = _record_whole_ties(monkeypatch, merging)
    whole = ties(base, models, density=density, weights=weights)
    assert statuses == [0]  # the one call did the whole merge
    monkeypatch.setattr(merging, "_WHOLE_TENSOR", 0)
    assert torch.equal(ties(base, models, density=density, weights=weights), whole)
    assert statuses == [0]  # the chunked path ran the second time
    assert torch.equal(whole, _reference_ties(base, models, density, weights))
    if case == "grid":
        k = int(density * n)
        for m in models:  # a tie straddles the cut-off: only the lowest flat indices among the tied are kept
            thr = torch.sort(m.abs(), descending=True, stable=True).values[k - 1]
            assert int((m.abs() > thr).sum()) < k < int((m.abs() >= thr).sum())


def test_ties_whole_tensor_call_hands_back_what_its_bracket_cannot_select(monkeypatch, fused_merging):
    # most deltas equal: the sample's bracket has equal ends, so the compiled call writes nothing and hands the
    # tensor back (status 1) to the per-model path, which gives the formula's bits
    merging = fused_merging
    g = torch.Generator().manual_seed(12)
    n = 60_000
    base = torch.zeros(n)
    models = [torch.where(torch.rand(n, generator=g) < 0.9, 0.5, torch.randn(n, generator=g)) for _ in range(3)]
    statuses = _record_whole_ties(monkeypatch, merging)
    out = ties(base, models, density=0.5)
    assert statuses == [1]
    assert torch.equal(out, _reference_ties(base, models, 0.5, None))


def test_ties_whole_tensor_call_rejects_nan_and_shares_the_bracket_formula(monkeypatch, fused_merging):
    merging = fused_merging
    g = torch.Generator().manual_seed(13)
    base = torch.randn(50_000, generator=g)
    models = [base + 1e-3 * torch.randn(50_000, generator=g) for _ in range(3)]
    models[1][31_337] = float("nan")  # not on the sample's stride (50_000 // 16384 = 3)
    statuses = _record_whole_ties(monkeypatch, merging)
    with pytest.raises(ValueError, match="NaN"):
        ties(base, models, density=0.5)
    assert statuses == [2]
    # the compiled bracket and the Python one (_bracket) are one formula: the same ranks
    for s, numel, k in [(16384, 150_001, 45_000), (16757, 552_960, 1), (16384, 10**6, 10**6 - 1), (500, 600, 300)]:
        assert merging.K._bracket_ranks(s, numel, k, 0.0) == merging.K.bracket_ranks(s, numel, k, 0.0)


def test_side_by_side_tensors_equal_the_in_memory_merge_and_stay_bounded(tmp_path, monkeypatch):
    # merge_safetensors merges tensors up to 1/THREADS of the largest side by side (one per thread) and runs a
    # bigger one alone: with 3 threads forced, a recording method sees at most 3 tensors at once, the large
    # ones with nothing else under way, and the file equals merge_state_dicts tensor for tensor, in file order
    import threading
    import time

    import models.merging as merging

    monkeypatch.setattr(merging, "THREADS", 3)
    g = torch.Generator().manual_seed(5)
    shapes = {"emb": (300, 200), "l0.q": (60, 50), "l0.norm": (50,), "l0.mlp": (100, 110), "l1.q": (60, 50),
              "l1.norm": (50,), "l1.mlp": (100, 110), "l2.mlp": (20_000,), "l2.q": (60, 50), "head": (250, 200)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sds = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, sd in enumerate(sds):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    active, seen, lock = set(), [], threading.Lock()

    @register_merge("_test_recording_ties")
    def recording(b, models, density=0.5):
        with lock:
            active.add(b.numel())
            seen.append(frozenset(active))
        time.sleep(0.02)  # long enough for the others to start if they were allowed to
        try:
            return ties(b, models, density=density)
        finally:
            with lock:
                active.discard(b.numel())

    out = str(tmp_path / "out" / "merged.safetensors")
    try:
        merge_safetensors("_test_recording_ties", str(tmp_path / "base.safetensors"), paths, out, density=0.3)
    finally:
        MERGE_METHODS.pop("_test_recording_ties")
    largest = 300 * 200
    assert max(len(s) for s in seen) >= 2  # something did run side by side
    assert all(len(s) <= 3 for s in seen)
    for s in seen:  # a tensor over a third of the largest never shares the threads
        assert all(n <= largest // 3 for n in s) or len(s) == 1
    got = load_file(out)
    expect = merge_state_dicts("ties", base, sds, density=0.3)
    from models.merge_io import read_header

    assert list(read_header(out)[0]) == list(read_header(str(tmp_path / "base.safetensors"))[0])  # file order
    for k in expect:
        assert torch.equal(got[k], expect[k]), k


def test_first_failing_tensor_in_file_order_is_raised_when_side_by_side(tmp_path, monkeypatch):
    # three small tensors merged side by side; the method fails on two of them, the later one at once and
    # the earlier one after a while: the error raised is the earlier one's (as a one-tensor-at-a-time merge
    # would raise), and nothing is written
    import time

    import models.merging as merging

    monkeypatch.setattr(merging, "THREADS", 4)

    def extra(base, sds):
        base["z.big"] = torch.randn(64)
        for sd in sds:
            sd["z.big"] = base["z.big"] + 0.1
    base, paths, out = _write_models(tmp_path, extra=extra)
    order = list(__import__("models.merge_io", fromlist=["read_header"]).read_header(base)[0])
    small = [k for k in order if k != "z.big"]
    assert order[-1] == "z.big"  # the small ones are under way together before it
    first, later = small[0], small[-1]
    sizes = {k: v.numel() for k, v in load_file(base).items()}

    @register_merge("_test_failing")
    def failing(b, models):
        if b.numel() == sizes[first]:
            time.sleep(0.3)
            raise ValueError(f"failed on {first}")
        if b.numel() == sizes[later]:
            raise ValueError(f"failed on {later}")
        return b.clone()

    assert len({sizes[k] for k in small}) == len(small)  # the method tells them apart by size
    try:
        with pytest.raises(ValueError, match=f"failed on {first}"):
            merge_safetensors("_test_failing", base, paths, out)
    finally:
        MERGE_METHODS.pop("_test_failing")
    _assert_nothing_written(out)


@pytest.mark.parametrize("case", ["bracketed", "missed", "zero_variances", "tied"])
def test_sce_one_pass_selection_equals_the_separate_passes_and_the_formula(case, monkeypatch, fused_merging):
    # SCE's one pass (variance, bracketed selection, energies) against the separate passes and the formula,
    # bit for bit: a bracket that holds the k-th largest variance; one that misses it (the sampled positions,
    # every 6th, carry small variances and the others large ones, so the bracket lies far below the k-th
    # largest and the pass falls back on the variances it computed); and a share of zero variances, which
    # widens the bracket
    merging = fused_merging
    g = torch.Generator().manual_seed(11)
    numel = 100_000
    base = torch.randn(numel, generator=g)
    noise = [0.1 * (j + 1) * torch.randn(numel, generator=g) for j in range(3)]  # unequal energies
    if case == "missed":
        sampled = torch.arange(numel) % (numel // merging._SAMPLE) == 0
        noise = [torch.where(sampled, 1e-3 * x, x) for x in noise]
    elif case == "tied":  # deltas on a grid of 0.05: many positions share each variance, ties at the cut-off
        noise = [torch.round(x * 20) / 20 for x in noise]
    elif case == "zero_variances":
        keep = torch.rand(numel, generator=g) < 0.3
        noise = [x * keep for x in noise]
    models = [base + x for x in noise]
    seen = []
    real = merging._sce_one_pass
    monkeypatch.setattr(merging, "_sce_one_pass", lambda *a: seen.append(real(*a)) or seen[-1])
    one = sce(base, models, select_topk=0.2)
    kind = {"bracketed": tuple, "missed": int, "zero_variances": tuple, "tied": tuple}[case]
    assert isinstance(seen[0], kind)
    if kind is tuple:
        assert len(set(seen[0][2].tolist())) == 3  # the energy weights are not the uniform fallback
        assert (seen[0][1] < numel) == (case == "tied")  # the cut-off index falls inside the tied values
    monkeypatch.setattr(merging, "_sce_one_pass", lambda *a: None)
    assert torch.equal(one, sce(base, models, select_topk=0.2))
    assert torch.equal(one, _reference_sce(base, models, 0.2))


def test_merge_state_dicts_runs_small_tensors_side_by_side_in_order(monkeypatch):
    # the in-memory merge (Twin-Merging's shared expert) schedules tensors as merge_safetensors does: with 3
    # threads forced, small tensors overlap, the result keeps the base's order and equals the method applied
    # tensor by tensor; an excluded tensor is a copy of the base
    import threading
    import time

    import models.merging as merging

    monkeypatch.setattr(merging, "THREADS", 3)
    g = torch.Generator().manual_seed(8)
    shapes = {"z.emb": (400, 100), "a.q": (30, 40), "m.norm": (40,), "b.mlp": (50, 60), "c.q": (30, 40),
              "head": (100, 400)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sds = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    active, most, lock = set(), [0], threading.Lock()

    @register_merge("_test_overlap")
    def overlap(b, models):
        with lock:
            active.add(threading.get_ident())
            most[0] = max(most[0], len(active))
        time.sleep(0.02)
        with lock:
            active.discard(threading.get_ident())
        return task_arithmetic(b, models, lam=0.5)

    try:
        out = merge_state_dicts("_test_overlap", base, sds, exclude=["m.norm"])
    finally:
        MERGE_METHODS.pop("_test_overlap")
    assert most[0] >= 2
    assert list(out) == list(shapes)
    for k in shapes:
        expect = base[k] if k == "m.norm" else task_arithmetic(base[k], [sd[k] for sd in sds], lam=0.5)
        assert torch.equal(out[k], expect), k
    assert out["m.norm"].data_ptr() != base["m.norm"].data_ptr()


@pytest.mark.parametrize("case", ["normal", "narrow", "mostly_zero", "few_values", "nan_inf_negzero", "tiny",
                                  "all_equal"])
def test_radix_select_equals_numpy_partition(case):
    """The selections' order statistics (K.select_nonneg_f32) against np.partition, at the ends, the middle
    and random ranks: spread and narrow values, a majority of zeros and few distinct values (many equal keys:
    the rounds must stop), NaN / inf / -0.0, a handful of elements, all equal."""
    import numpy as np

    import models.merge_kernels as K

    if not K.AVAILABLE:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(11)
    x = {"normal": lambda: np.abs(rng.standard_normal(50_001)),
         "narrow": lambda: 1 + rng.random(40_000) * 1e-4,
         "mostly_zero": lambda: np.where(rng.random(30_000) < 0.8, 0.0, rng.random(30_000)),
         "few_values": lambda: rng.integers(0, 4, 20_000).astype(float) * 0.25,
         "nan_inf_negzero": lambda: np.concatenate([rng.random(500), [np.inf, np.nan, -0.0, 0.0, np.inf, -np.nan]]),
         "tiny": lambda: rng.random(5),
         "all_equal": lambda: np.full(1000, 0.125)}[case]().astype(np.float32)
    before = x.copy()
    ranks = np.array(sorted({0, x.size - 1, x.size // 2, *rng.integers(0, x.size, 12).tolist()}))
    got = np.empty(ranks.size, dtype=np.float32)
    K.select_nonneg_f32(x, ranks, got)  # every rank from one first round
    for r, value in zip(ranks, got):
        expect = np.partition(x.copy(), r)[r]
        assert (np.isnan(value) and np.isnan(expect)) or value == expect, (case, r, value, expect)
    assert np.array_equal(x, before, equal_nan=True)  # the input is left as it was


def test_order_statistic_out_of_range_is_an_error_not_a_read_past_the_end():
    import models.merging as merging

    x = torch.rand(100)
    for bad in ([100], [-1], [5, 100]):
        with pytest.raises(IndexError):
            merging._smallest(x, bad)
    assert float(merging._smallest(x, [99])[0]) == float(x.max())


def test_bracketed_positions_compress_equals_the_portable_loop():
    """The selection scans' collection: the AVX-512 compress path (used where the CPU has it) finds the same
    positions in the same order as the portable loop, for block lengths that are and are not multiples of
    16, brackets holding nothing, everything, a few percent, zero, inf and NaN's neighbourhood."""
    import numpy as np

    import models.merge_kernels as K

    if not K.AVAILABLE:
        pytest.skip("numba not installed")
    if not K.AVX512:
        pytest.skip("this CPU has no AVX-512: only the portable loop runs here")
    rng = np.random.default_rng(5)
    block = K.SCAN_BLOCK
    values = np.abs(rng.standard_normal(block)).astype(np.float32)
    values[[3, 40, 41, 200]] = [0.0, np.inf, np.nan, 1e-45]
    ubuf = values.view(np.uint32)

    def bits(x):
        return np.float32(x).view(np.uint32)

    brackets = [(bits(0.5), bits(0.52)), (bits(0.0), bits(np.inf)), (bits(2.0), bits(1.5)), (bits(0.0), bits(0.0)),
                (bits(np.inf), bits(np.inf)), (bits(1e-45), bits(0.3)), (bits(3.0), bits(np.inf))]
    for lo, hi in brackets:
        span = np.uint32((int(hi) - int(lo)) % 2**32)  # (a bracket with hi < lo wraps round)
        for m in (block, block - 1, 17, 16, 15, 1, 0):
            a = np.full(block + 16, -1, dtype=np.int32)
            b = np.full(block + 16, -1, dtype=np.int32)
            ha = K.bracketed_positions_avx512(ubuf, m, np.uint32(lo), span, a)
            hb = K.bracketed_positions_portable(ubuf, m, np.uint32(lo), span, b)
            expect = [i for i in range(m) if (int(ubuf[i]) - int(lo)) % 2**32 <= span]  # the definition
            assert ha == hb == len(expect) and a[:ha].tolist() == b[:hb].tolist() == expect, (lo, hi, m)
