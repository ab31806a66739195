import pytest
import torch
from safetensors.torch import load_file, save_file

from models.merging import MERGE_METHODS, dare, merge_safetensors, merge_state_dicts, sce, task_arithmetic, ties, varm

D = torch.float64


def t(*v):
    return torch.tensor(v, dtype=D)


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


def test_ties_stable_tie_break_keeps_lowest_index():
    # all magnitudes equal, k=2: positions 0 and 1 kept
    out = ties(t(0, 0, 0, 0), [t(1, 1, 1, 1)], density=0.5)
    assert torch.allclose(out, t(1, 1, 0, 0))


def test_varm_hand_values():
    # mean sq: d1=[1,1] -> 1, d2=[2,0] -> 2; w=[1/3,2/3]; [1/3+4/3, 1/3]
    out = varm(t(0, 0), [t(1, 1), t(2, 0)])
    assert torch.allclose(out, t(5 / 3, 1 / 3))


def test_sce_hand_values():
    # variance (population): [1,4,0,1]; top-2 -> pos1, pos0 (tie with pos3, lower index kept)
    # masked d1=[1,2,0,0], d2=[3,-2,0,0]; energies 5/4, 13/4 -> w = 5/18, 13/18
    # summed sign [+,+]; pos0 both agree: (5*1+13*3)/18 = 22/9; pos1 only d1 agrees -> 2
    out = sce(t(0, 0, 0, 0), [t(1, 2, 0, -1), t(3, -2, 0, 1)], select_topk=0.5)
    assert torch.allclose(out, t(22 / 9, 2, 0, 0))
    # the same deltas around a pivot of 5: masked, unselected positions stay at the pivot
    models = [t(6, 7, 5, 4), t(8, 3, 5, 6)]
    assert torch.allclose(sce(t(5, 5, 5, 5), models, select_topk=0.5), t(5 + 22 / 9, 7, 5, 5))
    # unmasked final sum: same weights (from the masked deltas), raw deltas everywhere; pos3 summed
    # sign 0 -> +, only d2 = +1 agrees -> 6; pos2 all deltas 0 -> pivot
    out2 = sce(t(5, 5, 5, 5), models, select_topk=0.5, masked_final_sum=False)
    assert torch.allclose(out2, t(5 + 22 / 9, 7, 5, 6))


def test_sce_uniform_fallback_for_tiny_energy():
    # energies ~1e-14 -> uniform weights: pos0 (1e-7+3e-7)/2 = 2e-7
    out = sce(t(0, 0), [t(1e-7, 0), t(3e-7, 0)], select_topk=0.5)
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
