"""Token shards: blocks against an independent packing, ranks, resume, reuse, cut preparations, datasets sources."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data.shards as shards_mod
from data.config import DataConfig
from data.corpus import DataError, EmbeddedSource, doc_hash64, split_documents
from data.datamodule import LMDataModule, pack_sequences
from tests.conftest import ROOT

ARC = ROOT / "tests" / "fixtures" / "hub" / "ai2_arc"
ARC_TEMPLATE = "Question: {question}\nAnswer: {answerKey}"


def _dm(cache, **kw) -> LMDataModule:
    kw.setdefault("max_chars_per_domain", 60_000)
    dm = LMDataModule(DataConfig(cache_dir=str(cache), **kw), seed=5, progress=False)
    dm.prepare()
    return dm


def _encode(dm, texts):
    return dm.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _reference_blocks(dm, docs_by_domain, is_val, block_size):
    """Independent expectation: per domain, tokenise the split's documents with the Hugging Face tokenizer
    (not the shards' worker encoder), pack with EOS separators, cut into blocks, concatenate the domains."""
    out = {"train": [], "val": []}
    for dom in sorted(docs_by_domain):
        docs = docs_by_domain[dom]
        for split in ("train", "val"):
            texts = [d.text for d in docs if is_val(dom, d) == (split == "val")]
            out[split].append(pack_sequences(_encode(dm, texts), dm.tokenizer.eos_token_id, block_size))
    return {k: np.concatenate(v) for k, v in out.items()}


def _nonblank(docs):
    return {dom: [d for d in ds if d.text.strip()] for dom, ds in docs.items()}


def _hash_rule_val_ids(docs, f, shard_chars):
    """The documented split of a domain larger than shard_chars, restated: chunks close after the document
    that brings them to shard_chars characters; validation iff md5 prefix < f * 2**64; until the domain has a
    validation (training) document, a chunk without one gives it its smallest- (largest-) hash document."""
    assert sum(len(d.text) for d in docs) >= shard_chars
    chunks, chunk, chars = [], [], 0
    for d in docs:
        chunk.append(d)
        chars += len(d.text)
        if chars >= shard_chars:
            chunks.append(chunk)
            chunk, chars = [], 0
    chunks += [chunk] if chunk else []
    val, has_val, has_train = set(), False, False
    for ch in chunks:
        h = {d.doc_id: doc_hash64(d.doc_id) for d in ch}
        v = {i for i in h if h[i] < f * 2 ** 64}
        if not has_val and not v:
            v = {min(h, key=h.get)}
        elif not has_train and len(v) == len(ch):
            v -= {max(h, key=h.get)}
        has_val, has_train = has_val or bool(v), has_train or len(v) < len(ch)
        val |= v
    return val


def test_domain_chunks_give_a_large_domain_both_splits():
    from data.shards import domain_chunks

    # ids whose hashes are all above 0.05 * 2**64: the threshold alone would leave no validation document
    ids = [f"doc{i}" for i in range(400) if doc_hash64(f"doc{i}") >= 0.05 * 2 ** 64][:6]
    chunks = list(domain_chunks(((i, "x" * 10) for i in ids), "d", 0.05, shard_chars=20))
    assert [len(c) for c in chunks] == [2, 2, 2]
    h0, h1 = doc_hash64(ids[0]), doc_hash64(ids[1])
    assert [f for f, _ in chunks[0]] == [h0 < h1, h1 < h0]  # the smaller hash of the first chunk
    assert not any(f for c in chunks[1:] for f, _ in c)  # the domain has its validation document now
    # all validation by the threshold (f = 1): the first chunk gives its largest hash to training
    chunks = list(domain_chunks(((i, "x" * 10) for i in ids), "d", 1.0, shard_chars=20))
    assert sum(not f for c in chunks for f, _ in c) == 1 and not all(f for f, _ in chunks[0])
    with pytest.raises(DataError, match="has 1 document"):
        list(domain_chunks([("a", "text")], "d", 0.05, shard_chars=1000))


def test_blocks_equal_independent_packing_small_domains(tmp_path):
    dm = _dm(tmp_path, domains=["pydoc", "stdlib"], block_size=64)
    docs = _nonblank(EmbeddedSource(["pydoc", "stdlib"], 60_000).docs)
    val_ids = {dom: {d.doc_id for d in split_documents(ds, 0.05)[1]} for dom, ds in docs.items()}
    ref = _reference_blocks(dm, docs, lambda dom, d: d.doc_id in val_ids[dom], 64)
    assert np.array_equal(np.asarray(dm.train_set.blocks), ref["train"])
    assert np.array_equal(np.asarray(dm.val_set.blocks), ref["val"])
    # every block carries its domain; the counts per domain follow the token counts
    doms = np.asarray(dm.train_set.domains)
    for d, name in enumerate(dm.domain_names):
        assert (doms == d).sum() == dm.stats["tokens"][name]["train"] // 64
        assert dm.train_set[int(np.flatnonzero(doms == d)[0])]["domain"].item() == d
    item = dm.train_set[3]
    assert item["input_ids"].dtype == torch.int64 and torch.equal(item["input_ids"], torch.from_numpy(ref["train"][3]))
    assert dm.manifest["dtype"] == "uint16" and (dm.shard_dir / "tokenizer" / "tokenizer.json").exists()


def test_large_domains_hash_rule_blocks_across_shards_and_num_proc(tmp_path):
    # shard_chars far below the domain size: many chunks per domain, blocks spanning chunk boundaries,
    # the hash-threshold rule; two worker processes write the same bytes as one
    kw = dict(domains=["pydoc", "licenses"], block_size=48, shard_chars=5_000, val_fraction=0.2)
    one = _dm(tmp_path / "one", num_proc=1, **kw)
    two = _dm(tmp_path / "two", num_proc=2, **kw)
    assert len(one.manifest["shards"]) > 8
    names = [sh["file"] for sh in one.manifest["shards"]]
    assert names == [sh["file"] for sh in two.manifest["shards"]]
    for name in names:
        assert (one.shard_dir / name).read_bytes() == (two.shard_dir / name).read_bytes()
    docs = _nonblank(EmbeddedSource(["pydoc", "licenses"], 60_000).docs)
    val_ids = {dom: _hash_rule_val_ids(ds, 0.2, 5_000) for dom, ds in docs.items()}
    ref = _reference_blocks(one, docs, lambda dom, d: d.doc_id in val_ids[dom], 48)
    assert np.array_equal(np.asarray(one.train_set.blocks), ref["train"])
    assert np.array_equal(np.asarray(one.val_set.blocks), ref["val"])
    c = one.manifest["counts"]["pydoc"]
    assert c["docs"]["val"] > 0 and c["shards"] > 1


def test_two_ranks_read_disjoint_blocks_whose_union_is_the_split(tmp_path):
    dm = _dm(tmp_path, domains=["pydoc", "licenses"], block_size=32, batch_size=2)
    for split, ds in (("train", dm.train_set), ("val", dm.val_set)):
        n = len(ds)
        seen = []
        for rank in (0, 1):
            idx = list(iter(dm.loader(split, rank=rank, world_size=2).sampler))
            assert len(idx) == -(-n // 2)
            seen.append(idx)
        assert set(seen[0]) | set(seen[1]) == set(range(n))
        overlap = set(seen[0]) & set(seen[1])
        assert len(overlap) == (n % 2)  # only the wrap-around padding of an odd count repeats a block
    # the contents: each rank's batches are the blocks at its sampler's positions, in order
    blocks = np.asarray(dm.train_set.blocks)
    for rank in (0, 1):
        loader = dm.loader("train", rank=rank, world_size=2)
        idx = list(iter(loader.sampler))
        rows = torch.cat([b["input_ids"] for b in loader]).numpy()
        assert len(rows) == len(idx) // 2 * 2  # batch_size 2, the last incomplete batch dropped
        assert np.array_equal(rows, blocks[idx[: len(rows)]])


def test_dataset_pickles_without_its_open_files(tmp_path):
    import pickle

    dm = _dm(tmp_path, domains=["pydoc"], block_size=32)
    want = [dm.train_set[i]["input_ids"] for i in (0, 7, len(dm.train_set) - 1)]
    blob = pickle.dumps(dm.train_set)  # what a spawned DataLoader worker receives
    assert len(blob) < 20_000 < dm.manifest["total_tokens"] * 2
    copy = pickle.loads(blob)
    got = [copy[i]["input_ids"] for i in (0, 7, len(copy) - 1)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    copy.index.shards.close()  # files closed: the next read opens them again
    assert torch.equal(copy[7]["input_ids"], want[1])


def test_cut_loader_resumed_in_a_new_datamodule_sees_the_uncut_batches(tmp_path):
    kw = dict(domains=["pydoc", "stdlib"], block_size=32, batch_size=8)
    for rank in (0, 1):
        uncut = _dm(tmp_path, **kw).loader("train", rank=rank, world_size=2)
        want = [b["input_ids"] for b in uncut]
        uncut.sampler.set_epoch(1)
        want_next_epoch = [b["input_ids"] for b in uncut]
        assert not torch.equal(want[0], want_next_epoch[0])

        cut = _dm(tmp_path, **kw).loader("train", rank=rank, world_size=2)
        it = iter(cut)
        head = [next(it)["input_ids"] for _ in range(5)]
        state = cut.state_dict()
        torch.save(state, tmp_path / "state.pt")  # as a checkpoint carries it

        fresh = _dm(tmp_path, **kw)  # a new process's DataModule: finds the same shards
        assert not fresh.built
        resumed = fresh.loader("train", rank=rank, world_size=2)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
        rest = [b["input_ids"] for b in resumed]
        got = head + rest
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        resumed.sampler.set_epoch(1)
        assert all(torch.equal(a, b) for a, b in zip([b["input_ids"] for b in resumed], want_next_epoch))


def test_second_prepare_reuses_the_manifest_without_tokenising(tmp_path, monkeypatch):
    first = _dm(tmp_path, domains=["pydoc"], shard_chars=20_000, num_proc=1)
    assert first.built
    manifest = first.shard_dir / "manifest.json"
    stamp = manifest.stat().st_mtime_ns

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(shards_mod, "write_chunk", no_tokenising)
    second = _dm(tmp_path, domains=["pydoc"], shard_chars=20_000, num_proc=1, block_size=16)
    assert not second.built and manifest.stat().st_mtime_ns == stamp
    assert second.shard_dir == first.shard_dir and second.stats["tokens"] == first.stats["tokens"]
    # a different block size reads the same tokens: block 9 of 16 is tokens 16..31 of block 1 of 128
    assert np.array_equal(second.train_set.blocks[9], first.train_set.blocks[1][16:32])


def test_cut_preparation_resumes_from_the_written_shards(tmp_path, monkeypatch):
    kw = dict(domains=["pydoc", "licenses"], shard_chars=15_000, num_proc=1)
    real = shards_mod.write_chunk
    calls = []

    def cut_after_three(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped in the middle of the preparation
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(shards_mod, "write_chunk", cut_after_three)
    with pytest.raises(KeyboardInterrupt):
        _dm(tmp_path / "cut", **kw)
    shard_dir = next((tmp_path / "cut" / "shards").iterdir())
    assert not (shard_dir / "manifest.json").exists()
    assert sorted(p.name for p in shard_dir.glob("c*.json")) == ["c000000.json", "c000001.json", "c000002.json"]
    (shard_dir / "c000003.bin.tmp999").write_bytes(b"\0" * 10)  # a half-written shard of the killed process
    (shard_dir / "c000004.bin").write_bytes(b"\0" * 10)  # renamed, but its commit mark was never written

    calls.clear()
    monkeypatch.setattr(shards_mod, "write_chunk", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    resumed = _dm(tmp_path / "cut", **kw)
    n = len(resumed.manifest["shards"])
    assert calls == list(range(3, n)) and resumed.manifest["prepared"]["chunks_reused"] == 3
    assert not list(shard_dir.glob("*.tmp*"))

    monkeypatch.setattr(shards_mod, "write_chunk", real)
    fresh = _dm(tmp_path / "fresh", **dict(kw, num_proc=2))
    assert fresh.manifest["counts"] == resumed.manifest["counts"]
    for sh in fresh.manifest["shards"]:
        assert (fresh.shard_dir / sh["file"]).read_bytes() == (shard_dir / sh["file"]).read_bytes()


def _write_corpus_files(root: Path):
    """The same 40 documents as .txt paragraphs, .jsonl, a .json array, .parquet and .csv."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from data.corpus import pydoc_documents

    texts = [re.sub(r"\n\s*\n", "\n", d.text[:400]).strip() for d in pydoc_documents()[:40]]
    texts = [t for t in texts if t]
    root.mkdir(parents=True, exist_ok=True)
    (root / "para.txt").write_text("\n\n".join(texts))  # (a final newline would belong to the last text)
    (root / "lines.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    (root / "arr.json").write_text(json.dumps([{"text": t} for t in texts]))
    pq.write_table(pa.table({"text": texts}), root / "cols.parquet")
    pacsv.write_csv(pa.table({"text": texts}), root / "rows.csv")
    return texts


def test_files_load_through_datasets_streaming_or_cached(tmp_path):
    texts = _write_corpus_files(tmp_path / "in")
    files = [str(tmp_path / "in" / f) for f in ("para.txt", "lines.jsonl", "arr.json", "cols.parquet", "rows.csv")]
    kw = dict(source="files", files=files, vocab_size=400, block_size=16, tokenizer_train_chars=20_000)
    streamed = _dm(tmp_path / "s", **kw)
    cached = _dm(tmp_path / "c", streaming=False, **kw)
    assert streamed.domain_names == ["arr", "cols", "lines", "para", "rows"]
    for dom in streamed.domain_names:
        c = streamed.manifest["counts"][dom]
        assert c["docs"]["train"] + c["docs"]["val"] == len(texts)
    # every format holds the same documents: as many tokens in every domain (split differently: the document
    # ids name the file), streamed or from Arrow
    tokens = {sum(streamed.manifest["counts"][dom]["tokens"].values()) for dom in streamed.domain_names}
    assert len(tokens) == 1
    assert cached.manifest["counts"] == streamed.manifest["counts"]
    assert np.array_equal(np.asarray(cached.train_set.blocks), np.asarray(streamed.train_set.blocks))
    assert streamed.manifest["source"]["files"][0]["size"] == (tmp_path / "in" / "para.txt").stat().st_size


def test_hub_dataset_with_config_and_split_from_a_local_fixture(tmp_path):
    kw = dict(source="hub", hub_name=str(ARC), text_template=ARC_TEMPLATE, vocab_size=300, block_size=8,
              tokenizer_train_chars=5_000, val_fraction=0.2)
    test = _dm(tmp_path, hub_config="ARC-Challenge", hub_split="test", **kw)
    assert test.domain_names == ["ARC-Challenge"]
    counts = test.manifest["counts"]["ARC-Challenge"]["docs"]
    assert counts["train"] + counts["val"] == 5 and counts["val"] == 1
    text = test.tokenizer.decode(np.asarray(test.train_set.blocks).reshape(-1).tolist())
    rows = [json.loads(x) for x in (ARC / "ARC-Challenge" / "test-00000-of-00001.jsonl").read_text().splitlines()]
    first_train = [r for r in rows if r["question"] in text]
    assert len(first_train) >= 3 and "Answer: " in text
    assert "Which object in the sky" not in text  # ARC-Easy / train are other configs / splits
    easy = _dm(tmp_path, hub_config="ARC-Easy", hub_split="train", **kw)
    assert easy.shard_dir != test.shard_dir and easy.manifest["source"]["config"] == "ARC-Easy"
    streamed = _dm(tmp_path / "streamed", hub_config="ARC-Challenge", hub_split="test", streaming=True, **kw)
    assert streamed.manifest["counts"] == test.manifest["counts"]


def test_wikitext_schema_parquet_fixture(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.corpus import pydoc_documents

    root = tmp_path / "wikitext"
    (root / "wikitext-2-raw-v1").mkdir(parents=True)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: wikitext-2-raw-v1/{s}-*\n" for s in ("train", "validation", "test"))
        + "---\n")
    lines = []
    for d in pydoc_documents()[:30]:  # wikitext rows: ' = Title = ' headings, paragraphs and empty lines
        lines += ["", f" = {d.doc_id} = ", ""] + [ln for ln in d.text.splitlines()[:6]]
    for split, part in (("train", lines[: len(lines) // 2]), ("validation", lines[len(lines) // 2:]),
                        ("test", lines[:20])):
        pq.write_table(pa.table({"text": part}), root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    dm = _dm(tmp_path / "c", source="hub", hub_name=str(root), hub_config="wikitext-2-raw-v1",
             hub_split="validation", vocab_size=400, block_size=16)
    nonblank = [ln for ln in lines[len(lines) // 2:] if ln.strip()]
    c = dm.manifest["counts"]["wikitext-2-raw-v1"]
    assert c["docs"]["train"] + c["docs"]["val"] == len(nonblank)
    assert c["chars"] == sum(len(ln) for ln in nonblank)


@pytest.mark.parametrize("overrides, message", [
    (dict(hub_config="ARC-Hard"), r"BuilderConfig 'ARC-Hard' not found\. Available: \['ARC-Challenge', 'ARC-Easy'\]"),
    (dict(hub_config="ARC-Easy", hub_split="validation"), r'Unknown split "validation"'),
    (dict(hub_config=None), r"Config name is missing"),
    (dict(hub_config="ARC-Easy", text_template=None), r"has no column 'text' \(columns: \['id', 'question'"),
    (dict(hub_config="ARC-Easy", text_template="{query}"), r"names column 'query'"),
    (dict(hub_config="ARC-Easy", hub_name="allenai/ai2_arc"), r"needs the network, but HF_HUB_OFFLINE"),
])
def test_hub_errors_are_one_line(tmp_path, overrides, message):
    kw = dict(source="hub", hub_name=str(ARC), text_template=ARC_TEMPLATE, vocab_size=300, block_size=8)
    kw.update(overrides)
    with pytest.raises(DataError, match=message) as e:
        _dm(tmp_path, **kw)
    assert "\n" not in str(e.value)


def test_config_problems_are_data_errors(tmp_path):
    for kw, message in ((dict(source="files"), "needs data.files"), (dict(hub_config="x"), "applies to"),
                        (dict(num_proc=-1), "num_proc must be >= 0"), (dict(text_template="{"), "format string"),
                        (dict(source="hub"), "needs data.hub_name")):
        with pytest.raises(DataError, match=message):
            LMDataModule(DataConfig(cache_dir=str(tmp_path), **kw))


def test_make_data_command_prepares_then_reuses_and_errors_in_one_line(tmp_path, data_cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    base = [sys.executable, "-m", "recipes", "data", "tiny", f"data.cache_dir={tmp_path}", "data.source=hub",
            f"data.hub_name={ARC}", f"data.text_template={ARC_TEMPLATE!r}", "data.vocab_size=300",
            "data.block_size=8"]
    ok = subprocess.run(base + ["data.hub_config=ARC-Challenge", "data.hub_split=train"], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "(prepared now;" in ok.stdout and "ARC-Challenge:" in ok.stdout and "blocks of 8:" in ok.stdout
    bad = subprocess.run(base + ["data.hub_config=ARC-Hard"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "BuilderConfig 'ARC-Hard' not found" in errors[0]


# --------------------------------------------------------------------------------- chat data and loss masks

CHAT_WORDS = ["GPT4", "Correct", "User", "Assistant", ":", "Hi", "there", "Hello", "you", "How", "are", "Fine", "and",
              "a", "b", "c", "d", "e"]
TWO_TURNS = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello you"}]
FOUR_TURNS = [{"from": "human", "value": "How are you"}, {"from": "gpt", "value": "Fine"},
              {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]


def _word_tokenizer(out: Path) -> str:
    """A word-level fast tokenizer (one token per word or ':', '<|end_of_turn|>' a special token): every token
    position below can be counted by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *CHAT_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")
    fast.add_tokens(["<|end_of_turn|>"], special_tokens=True)
    fast.save_pretrained(str(out))
    return str(out)


def chat_datamodule(tmp_path, rows, **kw) -> LMDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "conversations": r}) + "\n" for i, r in enumerate(rows)))
    kw = {"source": "files", "files": [str(path)], "format": "chat", "loss_on": "assistant",
          "tokenizer": _word_tokenizer(tmp_path / "tok"), "val_fraction": 0.25, "num_proc": 1, **kw}
    return _dm(tmp_path / "cache", **kw)


@pytest.mark.parametrize("turns, words, counted", [
    # GPT4 Correct User : Hi there <eot> GPT4 Correct Assistant : | Hello you <eot> | EOS
    (TWO_TURNS, "GPT4 Correct User : Hi there <eot> GPT4 Correct Assistant : Hello you <eot>", [11, 12, 13, 14]),
    # the assistant's words and end-of-turn of both assistant turns (Fine <eot>, Hello <eot>), and the EOS
    (FOUR_TURNS, "GPT4 Correct User : How are you <eot> GPT4 Correct Assistant : Fine <eot> GPT4 Correct User : Hi "
                 "<eot> GPT4 Correct Assistant : Hello <eot>", [12, 13, 24, 25, 26]),
])
def test_chat_loss_mask_counts_the_assistant_tokens_only(tmp_path, turns, words, counted):
    n = len(words.split()) + 1  # one conversation per block: every block of both splits is the hand-written one
    blocks = chat_datamodule(tmp_path, [turns] * 4, block_size=n)
    vocab = blocks.tokenizer.get_vocab()
    ids = [vocab["<|end_of_turn|>" if w == "<eot>" else w] for w in words.split()] + [blocks.tokenizer.eos_token_id]
    mask = np.zeros(n, dtype=np.uint8)
    mask[counted] = 1
    labels = np.where(mask == 1, ids, -100)
    assert blocks.shards.masked and blocks.manifest["mask"] is True
    for ds in (blocks.train_set, blocks.val_set):
        assert len(ds) >= 1
        for i in range(len(ds)):
            item = ds[i]
            assert item["input_ids"].tolist() == ids
            assert item["labels"].tolist() == labels.tolist()
            assert ds.loss_mask(i).tolist() == mask.tolist()
    c = blocks.manifest["counts"]["chats"]
    assert c["loss_tokens"] == {"train": 3 * len(counted), "val": len(counted)}
    assert c["tokens"] == {"train": 3 * len(ids), "val": len(ids)}
    # loss_on=all: the same tokens, no mask file, every label the token (the text format's shards)
    everything = chat_datamodule(tmp_path / "all", [turns] * 4, loss_on="all", block_size=len(ids))
    assert not everything.shards.masked and "mask" not in everything.manifest
    assert not list(everything.shard_dir.glob("*.mask"))
    item = everything.train_set[0]
    assert item["input_ids"].tolist() == ids and torch.equal(item["labels"], item["input_ids"])


def _random_conversation(rng) -> list:
    words = CHAT_WORDS[5:]
    turns = []
    for t in range(int(rng.integers(1, 4)) * 2):
        value = " ".join(rng.choice(words, size=int(rng.integers(1, 30))).tolist())
        turns.append({"from": "human" if t % 2 == 0 else "gpt", "value": value})
    return turns


def _reference_chat(tok, turns):
    """Independent expectation: each turn's header and body tokenised on their own (the word tokenizer
    splits there anyway), mask 1 on the assistant bodies with their end-of-turn, then EOS with the last mask."""
    ids, mask = [], []
    for t in turns:
        head = tok(f"GPT4 Correct {'User' if t['from'] == 'human' else 'Assistant'}: ", add_special_tokens=False)
        body = tok(t["value"] + "<|end_of_turn|>", add_special_tokens=False)
        ids += head["input_ids"] + body["input_ids"]
        mask += [0] * len(head["input_ids"]) + [int(t["from"] == "gpt")] * len(body["input_ids"])
    return ids + [tok.eos_token_id], mask + [mask[-1]]


def test_masked_shards_round_trip_across_chunks_processes_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    rows = [_random_conversation(rng) for _ in range(120)]
    kw = dict(block_size=24, shard_chars=1_000, val_fraction=0.2, batch_size=4)
    one = chat_datamodule(tmp_path / "one", rows, **kw)
    two = chat_datamodule(tmp_path / "two", rows, num_proc=2, **kw)
    assert len(one.manifest["shards"]) > 4 and one.shards.masked
    for sh in one.manifest["shards"]:  # two processes write the same tokens and masks as one
        for name in (sh["file"], sh["mask_file"]):
            assert (one.shard_dir / name).read_bytes() == (two.shard_dir / name).read_bytes()
    # against the independent packing of the documented split (a domain above shard_chars: the hash rule)
    from data.corpus import Document

    def text(r):
        return "".join(f"GPT4 Correct {'User' if t['from'] == 'human' else 'Assistant'}: {t['value']}<|end_of_turn|>"
                       for t in r)

    docs = [Document("chats", f"chats.jsonl:{i}", text(r)) for i, r in enumerate(rows)]
    val_ids = _hash_rule_val_ids(docs, 0.2, 1_000)
    for split, ds in (("train", one.train_set), ("val", one.val_set)):
        refs = [_reference_chat(one.tokenizer, r) for d, r in zip(docs, rows)
                if (d.doc_id in val_ids) == (split == "val")]
        flat_ids = np.concatenate([np.asarray(i) for i, _ in refs])
        flat_mask = np.concatenate([np.asarray(m) for _, m in refs])
        n = len(flat_ids) // 24
        assert len(ds) == n
        want_labels = np.where(flat_mask[: n * 24] == 1, flat_ids[: n * 24], -100).reshape(n, 24)
        got = torch.stack([ds[i]["labels"] for i in range(n)]).numpy()
        assert np.array_equal(np.asarray(ds.blocks), flat_ids[: n * 24].reshape(n, 24))
        assert np.array_equal(got, want_labels)
    # a loader cut mid-epoch and resumed in a new datamodule gives the uncut batches, labels included
    uncut = [(b["input_ids"], b["labels"]) for b in one.loader("train", rank=1, world_size=2)]
    cut = one.loader("train", rank=1, world_size=2)
    it = iter(cut)
    head = [next(it) for _ in range(3)]
    state = cut.state_dict()
    resumed = chat_datamodule(tmp_path / "one", rows, **kw).loader("train", rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = [(b["input_ids"], b["labels"]) for b in head] + [(b["input_ids"], b["labels"]) for b in resumed]
    assert len(got) == len(uncut)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, uncut))


def test_chat_config_and_record_errors_are_one_line(tmp_path):
    bad = [({"format": "chat"}, "data.format=chat needs data.source=files or hub"),
           ({"source": "files", "files": ["x.jsonl"], "loss_on": "assistant"}, "needs data.format=chat"),
           ({"source": "files", "files": ["x.jsonl"], "format": "chat", "chat_template": "vicuna"},
            "data.chat_template must be one of openchat, tokenizer"),
           ({"source": "files", "files": ["x.jsonl"], "format": "chat", "chat_template": "tokenizer"},
            "needs a pretrained tokenizer with a chat template")]
    for kw, message in bad:
        with pytest.raises(DataError, match=re.escape(message)):
            LMDataModule(DataConfig(cache_dir=str(tmp_path), **kw))
    with pytest.raises(DataError, match=r"row 1: turn 0 has role 'robot'"):
        chat_datamodule(tmp_path / "role", [TWO_TURNS, [{"from": "robot", "value": "x"}], TWO_TURNS])
    path = tmp_path / "nocol.jsonl"
    path.write_text("".join(json.dumps({"text": "a b"}) + "\n" for _ in range(3)))
    with pytest.raises(DataError, match="has no column 'conversations'.*data.conversations_field"):
        _dm(tmp_path / "nocol", source="files", files=[str(path)], format="chat",
            tokenizer=_word_tokenizer(tmp_path / "t"))
