"""Reading a samples folder: ids, categories, refusals of bad files, and the index.tsv ledger."""

from __future__ import annotations

import pytest

from conftest import write_corpus
from tourray.corpus.texts import INDEX_FILE, check_index, load_samples, write_index
from tourray.errors import UserError


def by_source(samples):
    return {s.source: s for s in samples}


def test_ids_are_stable_and_follow_content(fresh_corpus):
    a = by_source(load_samples(fresh_corpus)[0])
    b = by_source(load_samples(fresh_corpus)[0])
    assert {k: s.sample_id for k, s in a.items()} == {k: s.sample_id for k, s in b.items()}
    assert len({s.sample_id for s in a.values()}) == len(a) == 6
    (fresh_corpus / "train/xian__bell-tower.txt").write_text("A different text.\n")
    c = by_source(load_samples(fresh_corpus)[0])
    changed = [k for k in a if a[k].sample_id != c[k].sample_id]
    assert changed == ["train/xian__bell-tower.txt"]


def test_same_text_in_two_files_gets_two_ids(tmp_path):
    write_corpus(tmp_path, {"a/x.txt": "same\n", "b/x.txt": "same\n"})
    s = load_samples(tmp_path)[0]
    assert s[0].sha256 == s[1].sha256 and s[0].sample_id != s[1].sample_id


def test_category_from_subfolder_then_index(fresh_corpus):
    cats = {s.source: s.category for s in load_samples(fresh_corpus)[0]}
    assert cats["train/sydney__opera-house.txt"] == "train"
    assert cats["eval/seen/sydney__observatory.txt"] == "eval"  # first sub-folder
    write_index(fresh_corpus)  # lists every file: train -> train, eval/<set>/... -> <set>
    cats = {s.source: s.category for s in load_samples(fresh_corpus)[0]}
    assert cats["eval/seen/sydney__observatory.txt"] == "seen"
    assert cats["train/sydney__opera-house.txt"] == "train"
    (fresh_corpus / "extra").mkdir()
    (fresh_corpus / "extra/new.txt").write_text("Not in the index.\n")
    cats = {s.source: s.category for s in load_samples(fresh_corpus)[0]}
    assert cats["extra/new.txt"] == "extra"  # unlisted file falls back to its sub-folder


def test_single_file_root(fresh_corpus):
    f = fresh_corpus / "train/xian__city-wall.txt"
    samples, skipped = load_samples(f)
    assert skipped == [] and len(samples) == 1
    s = samples[0]
    assert (s.source, s.category) == ("xian__city-wall.txt", "default")
    assert s.text == f.read_text(encoding="utf-8")


def make_bad(root):
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/empty.txt").write_bytes(b"")
    (root / "bad/blank.txt").write_bytes(b"  \n\t\n")
    (root / "bad/latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return ["bad/empty.txt", "bad/blank.txt", "bad/latin1.txt"]


def test_bad_files_are_all_named_in_one_error(fresh_corpus):
    bad = make_bad(fresh_corpus)
    with pytest.raises(UserError) as e:
        load_samples(fresh_corpus)
    msg = str(e.value)
    for name, why in zip(bad, ("empty", "whitespace only", "not UTF-8")):
        line = next(x for x in msg.splitlines() if name in x)
        assert why in line, line
    assert "--skip-invalid" in msg


def test_skip_invalid_keeps_the_good_and_lists_the_bad(fresh_corpus):
    bad = make_bad(fresh_corpus)
    samples, skipped = load_samples(fresh_corpus, skip_invalid=True)
    assert len(samples) == 6
    assert sorted(b.split(":")[0] for b in skipped) == sorted(str(fresh_corpus / b) for b in bad)


def test_missing_root_and_folder_without_texts(tmp_path):
    with pytest.raises(UserError, match="--samples: .*does not exist"):
        load_samples(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.md").write_text("not a .txt")
    with pytest.raises(UserError, match="--samples: no .txt files under"):
        load_samples(tmp_path / "empty")


def test_index_round_trip_and_change_detection(fresh_corpus):
    out = write_index(fresh_corpus)
    assert out == fresh_corpus / INDEX_FILE
    rows = out.read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["path", "split", "category", "city", "language", "sha256"]
    assert len(rows) == 7
    zh = next(r for r in rows if r.startswith("train/xian__city-wall.txt")).split("\t")
    assert zh[1:5] == ["train", "train", "xian", "zh"]
    assert check_index(fresh_corpus) == []
    (fresh_corpus / "train/xian__bell-tower.txt").write_text("Changed.\n")
    (fresh_corpus / "train/new__stop.txt").write_text("New.\n")
    (fresh_corpus / "eval/seen/xian__small-goose.txt").unlink()
    problems = check_index(fresh_corpus)
    assert any(p.startswith("train/xian__bell-tower.txt: sha256") for p in problems)
    assert "train/new__stop.txt: not in index.tsv" in problems
    assert "eval/seen/xian__small-goose.txt: listed in index.tsv but missing" in problems
    assert len(problems) == 3
