"""Data: packing, sharding, splitting and tokenizers against hand-computed expectations."""
import json

import numpy as np
import pytest

from data.config import DataConfig
from data.corpus import DataError, Document, check_data_file, embedded_documents, split_documents
from data.datamodule import LMDataModule, ShardedBlockSampler, pack_sequences, permute, shard_indices
from data.tokenizers import train_tokenizer


def test_pack_sequences_hand_computed():
    # [1,2,3] EOS [4,5] EOS [6] EOS -> 1 2 3 9 4 5 9 6 9 -> blocks of 4: [1 2 3 9] [4 5 9 6], rest dropped
    out = pack_sequences([[1, 2, 3], [4, 5], [6]], eos_id=9, block_size=4)
    assert out.tolist() == [[1, 2, 3, 9], [4, 5, 9, 6]]


def test_shard_indices_cover_and_pad():
    # n=5, 2 ranks, no shuffle: padded to 6 by wrapping -> [0..4, 0]; rank0 = 0,2,4 ; rank1 = 1,3,0
    assert shard_indices(5, 0, 2, 0, 0, shuffle=False) == [0, 2, 4]
    assert shard_indices(5, 1, 2, 0, 0, shuffle=False) == [1, 3, 0]
    # shuffled: the two ranks together cover every index, each epoch a different permutation
    a = shard_indices(10, 0, 2, 0, 7, True) + shard_indices(10, 1, 2, 0, 7, True)
    assert sorted(a) == list(range(10))
    assert shard_indices(10, 0, 2, 0, 7, True) != shard_indices(10, 0, 2, 1, 7, True)


def test_permutation_is_a_seeded_bijection_evaluated_anywhere():
    for n in (1, 2, 3, 5, 17, 1000, 4097):
        full = permute(np.arange(n), n, seed=11)
        assert sorted(full.tolist()) == list(range(n))
        # evaluated at a few positions only, it agrees with the whole permutation
        pos = np.array([n - 1, 0, n // 2])
        assert permute(pos, n, seed=11).tolist() == full[pos].tolist()
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert a.tolist() != list(range(1000)) and a.tolist() != b.tolist()
    # a shuffle, not a rotation: about half of the adjacent pairs change order
    assert 0.35 < float(np.mean(np.diff(a) > 0)) < 0.65


def test_validation_order_is_fixed_across_epochs():
    s = ShardedBlockSampler(50, seed=3, shuffle=True, per_epoch=False)
    first = list(iter(s))
    s.set_epoch(4)
    assert list(iter(s)) == first and sorted(first) == list(range(50)) and first != list(range(50))


def test_sampler_resumes_mid_epoch():
    s = ShardedBlockSampler(20, rank=1, world_size=2, seed=3)
    s.set_epoch(2)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    state = s.state_dict()
    rest = list(it)
    s2 = ShardedBlockSampler(20, rank=1, world_size=2, seed=3)
    s2.load_state_dict(state)
    assert list(iter(s2)) == rest
    assert first + rest == shard_indices(20, 1, 2, 2, 3, True)


def test_split_is_deterministic_and_disjoint():
    docs = [Document("d", f"id{i}", f"text {i}") for i in range(40)]
    tr, va = split_documents(docs, 0.1)
    tr2, va2 = split_documents(list(reversed(docs)), 0.1)
    assert len(va) == 4 and {d.doc_id for d in va} == {d.doc_id for d in va2}
    assert not {d.doc_id for d in tr} & {d.doc_id for d in va}


def test_embedded_domains_are_real_text():
    docs = embedded_documents(["pydoc", "stdlib"], 50_000)
    assert set(docs) == {"pydoc", "stdlib"}
    assert sum(len(d.text) for d in docs["stdlib"]) == 50_000
    assert any("def " in d.text for d in docs["stdlib"])
    with pytest.raises(DataError, match="Unknown embedded domain 'poetry'"):
        embedded_documents(["poetry"], 100)


def test_tokenizers_deterministic():
    docs = embedded_documents(["pydoc"], 60_000)["pydoc"]
    for kind in ("bpe", "unigram"):
        a = train_tokenizer(kind, 600, docs)
        b = train_tokenizer(kind, 600, docs)
        assert a.to_str() == b.to_str()
        enc = a.encode("def foo(x): return x")
        assert a.decode(enc.ids).strip() == "def foo(x): return x"


def test_file_errors_name_the_file(tmp_path, data_cache):
    with pytest.raises(DataError, match="not found: .*nope.txt"):
        check_data_file(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        check_data_file(str(tmp_path / "empty.txt"))
    (tmp_path / "x.pdf").write_text("%PDF")
    with pytest.raises(DataError, match="Unsupported data file type '.pdf'"):
        check_data_file(str(tmp_path / "x.pdf"))

    def prepare(path, **kw):
        LMDataModule(DataConfig(source="files", files=[str(path)], vocab_size=300, block_size=4,
                                cache_dir=str(tmp_path / "c"), **kw), progress=False).prepare()

    (tmp_path / "bad.txt").write_bytes(b"hello\n\nwor\xffld")
    for streaming in (True, False):  # read straight from the file, or through datasets' Arrow cache
        with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8: byte 0xff at offset 10 \(line 3\)"):
            prepare(tmp_path / "bad.txt", streaming=streaming)
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "a"}) + "\n")
    with pytest.raises(DataError, match="x.jsonl has no column 'text'"):
        prepare(tmp_path / "x.jsonl")


def test_local_files_and_block_size_error(tmp_path, data_cache):
    para = "The quick brown fox jumps over the lazy dog. " * 5
    (tmp_path / "a.txt").write_text("\n\n".join(f"{i} {para}" for i in range(30)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"{i} {para}"}) for i in range(30)))
    s = DataConfig(source="files", files=(str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")), vocab_size=300,
                     block_size=32, cache_dir=str(tmp_path / "c"), batch_size=4)
    dm = LMDataModule(s)
    dm.prepare()
    assert dm.domain_names == ["a", "b"]
    assert dm.stats["docs"]["a"]["train"] + dm.stats["docs"]["a"]["val"] == 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert set(np.unique(np.asarray(dm.train_set.domains))) == {0, 1}
    big = DataConfig(source="files", files=(str(tmp_path / "a.txt"),), vocab_size=300, block_size=100000,
                       cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="data.block_size=100000 is larger than"):
        LMDataModule(big).prepare()


def test_datamodule_loader_state_resumes(data_cache):
    dm = LMDataModule(DataConfig(cache_dir=data_cache, max_chars_per_domain=200000, batch_size=4))
    dm.prepare()
    dl = dm.train_dataloader()
    it = iter(dl)
    for _ in range(3):
        next(it)
    state = dl.state_dict()
    want = [next(it)["input_ids"] for _ in range(2)]
    dl2 = dm.train_dataloader()
    dl2.load_state_dict(state)
    it2 = iter(dl2)
    got = [next(it2)["input_ids"] for _ in range(2)]
    assert all((a == b).all() for a, b in zip(want, got))
