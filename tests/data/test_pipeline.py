"""Data pipeline: sources, tokenizers, packing with segment ids, determinism, resume, host sharding."""

import json

import numpy as np
import pytest

from m1_jax.data import (ByteTokenizer, DataConfig, DataError, DataIterator, HFTokenizer, make_source,
                         make_tokenizer)
from m1_jax.data.pipeline import shift_row


def _docs_file(tmp_path, docs, name="corpus.txt"):
    p = tmp_path / name
    p.write_text("\n\n".join(docs), encoding="utf-8")
    return str(p)


DOCS = [f"document number {i} " + "abc" * (i % 7 + 1) for i in range(40)]


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo, wörld")
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == "héllo, wörld"
    assert make_tokenizer("byte").vocab_size == 256


def test_encode_checked_reports_what_encode_loses(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "Grüße, 世界 🙂 x"
    ids, lost = ByteTokenizer().encode_checked(text)
    assert lost == "" and ids.tolist() == list(text.encode("utf-8"))
    ids, lost = ByteTokenizer().encode_checked("a\ud800b\udfffc\ud800")  # lone surrogates (JSON escapes)
    assert lost == "\ud800\udfff" and ByteTokenizer().decode(ids) == "abc"

    def hf(tok):
        tok.save(str(tmp_path / "tokenizer.json"))
        return HFTokenizer(str(tmp_path))

    unk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    unk.pre_tokenizer = pre_tokenizers.Whitespace()
    ids, lost = hf(unk).encode_checked("hello wörld hello  world")
    assert ids.tolist() == [1, 0, 1, 2] and sorted(lost) == sorted("wörd" + "l")  # "wörld" is [UNK]
    ids, lost = hf(unk).encode_checked("hello  world\n")
    assert ids.tolist() == [1, 2] and lost == ""  # whitespace the pre-tokenizer splits on is no loss

    # a BPE without unk token or byte fallback silently drops what its vocabulary lacks
    bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "c": 2, "ab": 3}, [("a", "b")]))
    ids, lost = hf(bpe).encode_checked("abcxabé")
    assert ids.tolist() == [3, 2, 3] and lost == "xé"

    # a byte-level BPE (MiniMax's kind) loses nothing
    blevel = Tokenizer(models.BPE())
    blevel.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    blevel.decoder = decoders.ByteLevel()
    blevel.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    ids, lost = hf(blevel).encode_checked(text)
    assert lost == "" and hf(blevel).decode(ids) == text


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = make_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 4 and tok.eos_id == 1
    assert tok.encode("hello world").tolist() == [2, 3]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(str(tmp_path / "tokenizer.json"), eos_token="<nope>")
    # EOS is appended after each document.
    src = _docs_file(tmp_path, ["hello world", "world hello hello"])
    it = DataIterator(DataConfig(source=src, tokenizer=str(tmp_path), seq_len=6, batch_size=1, shuffle=False))
    b = next(it)
    assert b["inputs"][0].tolist()[:6] == [2, 3, 1, 3, 2, 2]
    assert b["segment_ids"][0].tolist()[:6] == [1, 1, 1, 2, 2, 2]


def test_sources_text_jsonl_arrayrecord(tmp_path):
    txt = _docs_file(tmp_path, ["a b", "", "c d"])
    assert [make_source(txt)[i] for i in range(2)] == ["a b", "c d"]
    jl = tmp_path / "x.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[:5])) + "\n")
    s = make_source(str(jl))
    assert len(s) == 5 and s[3] == DOCS[3]
    from array_record.python.array_record_module import ArrayRecordWriter

    ar = tmp_path / "docs.array_record"
    w = ArrayRecordWriter(str(ar), "group_size:1")
    for d in DOCS[:6]:
        w.write(d.encode("utf-8"))
    w.close()
    s = make_source(str(ar))
    assert len(s) == 6 and s[5] == DOCS[5]
    with pytest.raises(FileNotFoundError, match="no files match"):
        make_source(str(tmp_path / "missing*.txt"))
    with pytest.raises(ValueError, match="mix formats"):
        make_source(f"{txt},{jl}")


def test_shift_row_masks_document_boundaries():
    row = {"tokens": np.array([5, 6, 7, 8, 9, 0]), "tokens_segment_ids": np.array([1, 1, 1, 2, 2, 0])}
    out = shift_row(row)
    assert out["inputs"].tolist() == [5, 6, 7, 8, 9]
    assert out["targets"].tolist() == [6, 7, 8, 9, 0]
    assert out["loss_mask"].tolist() == [1, 1, 0, 1, 0]  # no target across a boundary or on padding


def test_packing_keeps_every_token_in_order(tmp_path):
    src = _docs_file(tmp_path, DOCS)
    # batch_size 1: no partial last batch is dropped, so every token of the one epoch must come out.
    cfg = DataConfig(source=src, seq_len=16, batch_size=1, shuffle=False, num_epochs=1)
    # Rebuild the stream from the inputs + last target of each row; it must be the concatenated documents.
    stream, segments = [], []
    for b in DataIterator(cfg):
        stream.extend(b["inputs"][0].tolist() + [int(b["targets"][0, -1])])
        segments.extend(b["segment_ids"][0].tolist())
    want = [t for d in DOCS for t in ByteTokenizer().encode(d).tolist()]
    pad = len(stream) - len(want)
    assert 0 <= pad < 17 and stream[len(want):] == [0] * pad  # only the last row is padded, with 0
    assert stream[:len(want)] == want
    assert segments.count(0) in (pad, pad - 1)  # the padding is segment 0 (the last target has no segment id)


def test_segment_ids_and_mask_are_consistent(tmp_path):
    b = next(DataIterator(DataConfig(source=_docs_file(tmp_path, DOCS), seq_len=64, batch_size=4, seed=3)))
    seg, mask = b["segment_ids"], b["loss_mask"]
    assert seg.min() >= 1 and (np.diff(seg, axis=1) >= 0).all()
    assert mask.sum() < mask.size  # some document boundaries in 4 x 64 tokens of short documents
    assert b["inputs"].dtype == np.int32 and mask.dtype == np.float32


def test_shuffle_is_deterministic_and_epochs_differ(tmp_path):
    src = _docs_file(tmp_path, DOCS)
    take = lambda cfg, n: [next(it)["inputs"] for it in [DataIterator(cfg)] for _ in range(n)]
    a = take(DataConfig(source=src, seq_len=32, batch_size=2, seed=1), 3)
    b = take(DataConfig(source=src, seq_len=32, batch_size=2, seed=1), 3)
    c = take(DataConfig(source=src, seq_len=32, batch_size=2, seed=2), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    s = make_source(src)
    import grain

    ds = grain.MapDataset.source(s).shuffle(seed=1).repeat(2)
    n = len(s)
    assert [ds[i] for i in range(n)] != [ds[n + i] for i in range(n)]  # a new permutation each epoch
    assert sorted(ds[i] for i in range(n)) == sorted(ds[n + i] for i in range(n))


def test_iterator_state_resumes_exactly(tmp_path):
    cfg = DataConfig(source=_docs_file(tmp_path, DOCS), seq_len=24, batch_size=3, seed=5)
    it = DataIterator(cfg)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    want = [next(it) for _ in range(5)]
    it2 = DataIterator(cfg)
    it2.set_state(state)
    got = [next(it2) for _ in range(5)]
    for w, g in zip(want, got):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])


def test_per_host_shards_are_disjoint(tmp_path):
    src = _docs_file(tmp_path, DOCS)
    cfg = DataConfig(source=src, seq_len=2000, batch_size=2, shuffle=False, num_epochs=1)
    toks = []
    for p in range(2):
        b = next(DataIterator(cfg, process_index=p, process_count=2))
        assert b["inputs"].shape == (1, 2000)
        toks.append(ByteTokenizer().decode(b["inputs"][0][b["segment_ids"][0] > 0]))
    assert "document number 0 " in toks[0] and "document number 1 " in toks[1]
    assert "document number 1 " not in toks[0] and "document number 0 " not in toks[1]
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        DataConfig(batch_size=3).validate(process_count=2)


def _array_record(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()
    return str(path)


def test_bad_content_in_any_file_is_named_when_the_source_is_built(tmp_path):
    """Every file is checked (not only the first), before any batch is made; the error names the file,
    the record and what was expected."""
    good_txt = _docs_file(tmp_path, DOCS[:3], "a.txt")
    good_jl = tmp_path / "a.jsonl"
    good_jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))

    def expect(files, *fragments, **kw):
        with pytest.raises(DataError) as e:
            make_source(",".join(map(str, files)), **kw)
        for f in fragments:
            assert f in str(e.value), str(e.value)

    empty = tmp_path / "z_empty.txt"
    empty.write_text("")
    expect([good_txt, empty], f"{empty} holds no document (empty)")
    blank = tmp_path / "z_blank.txt"
    blank.write_text("\n\n  \n")
    expect([good_txt, blank], f"{blank} holds no document (only whitespace)")
    latin1 = tmp_path / "z_latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    expect([good_txt, latin1], f"{latin1} is not UTF-8 text (byte 3")
    dangling = tmp_path / "z_link.txt"
    dangling.symlink_to(tmp_path / "nowhere")
    expect([good_txt, dangling], f"cannot read {dangling}")

    def jsonl(name, lines):
        p = tmp_path / name
        p.write_text("".join(l + "\n" for l in lines))
        return p

    # a bad record in the middle of a later file (records 0 and -1 are fine): the sample reaches it
    recs = [json.dumps({"text": d}) for d in DOCS[:9]]
    mid = jsonl("z_mid.jsonl", recs[:4] + [json.dumps({"body": "x", "id": 4})] + recs[4:])
    expect([good_jl, mid], f"line 5 of {mid} has no field 'text' (fields: ['body', 'id'])")
    # a bad record the sample does not read raises the same error when the pipeline reaches it
    late = make_source(str(jsonl("z_late.jsonl", [recs[0], "[]"] + recs * 4)))
    with pytest.raises(DataError, match=r"line 2 of .*z_late.jsonl is a JSON list"):
        late[1]
    expect([good_jl, jsonl("z_num.jsonl", recs[:2] + [json.dumps({"text": 7})])], "field 'text' of line 3",
           "is a int; expected a string")
    expect([good_jl, jsonl("z_list.jsonl", ["[1, 2]"])], "line 1 of", "is a JSON list; expected an object")
    expect([good_jl, jsonl("z_broken.jsonl", recs[:1] + ['{"text": "unterminated'])], "line 2 of",
           "is not valid JSON")
    expect([good_jl, jsonl("z_none.jsonl", ["", "  "])], "holds no record (only blank lines)")
    expect([good_jl, jsonl("z_key.jsonl", recs[:3])], "has no field 'body'", text_key="body")

    good_ar = _array_record(tmp_path / "a.array_record", [d.encode() for d in DOCS[:5]])
    garbage = tmp_path / "z_garbage.array_record"
    garbage.write_bytes(b"not an array record file" * 10)
    expect([good_ar, garbage], f"{garbage} does not open as an ArrayRecord file")
    ar_latin = _array_record(tmp_path / "z_latin.array_record", [b"ok", "caf\xe9".encode("latin-1"), b"ok"])
    expect([good_ar, ar_latin], f"record 1 of {ar_latin} is not UTF-8")
    ar_json = _array_record(tmp_path / "z_json.array_record", [b'{"text": "a"}', b'{"txt": "b"}'])
    expect([ar_json], f"record 1 of {ar_json} has no field 'text'", record_format="json")
    assert make_source(ar_json + "", record_format="text")[1] == '{"txt": "b"}'  # as text it is a document


def test_train_exits_2_on_bad_data_before_creating_the_run_folder(tmp_path, capsys):
    from m1_jax.train import main

    good = _docs_file(tmp_path, DOCS, "a.txt")
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "no text field"}) + "\n")
    empty = tmp_path / "c.txt"
    empty.write_text("")
    for source, fragment in ((f"{good},{empty}", f"{empty} holds no document"),
                             (str(bad), f"line 2 of {bad} has no field 'text'")):
        run_dir = tmp_path / "run"
        code = main([f"--gin.DataConfig.source={source}", f"--gin.TrainConfig.run_dir={run_dir}",
                     "--gin.TrainConfig.steps=2"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith("train.py: error: data: ") and fragment in err and err.count("\n") == 1, err
        assert not run_dir.exists()  # nothing was started
