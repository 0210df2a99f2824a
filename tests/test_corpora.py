import pytest

from empirical.corpora import (RESOURCE_LEVEL, load_parallel_dir, load_text_files, load_udhr,
                               split_sentences)


def test_udhr_default_corpus():
    c = load_udhr()
    assert len(c) > 300
    assert "heb_Hebr" in c.texts and "eng_Latn" in c.texts
    sub = load_udhr(["heb", "en", "zho_Hans", "he_Hebr"])
    assert set(sub.languages) == {"heb_Hebr", "eng_Latn", "zho_Hans"}
    info = sub.info["heb_Hebr"]
    assert (info.iso639_3, info.script, info.resource_level) == ("heb", "Hebr", "medium")
    for segs in sub.texts.values():
        assert len(segs) >= 3 and all(s.strip() for s in segs)
        # no segment is an excerpt of another
        assert not any(a != b and a in b for a in segs for b in segs)


def test_unknown_code_lists_available():
    with pytest.raises(ValueError, match="available codes: .*heb_Hebr"):
        load_udhr(["xx_Nope"])


def test_split_sentences():
    assert split_sentences("One. Two! Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    assert split_sentences("一つ。二つ。") == ["一つ。", "二つ。"]


def test_resource_levels_table():
    assert RESOURCE_LEVEL["eng"] == "high" and RESOURCE_LEVEL["yor"] == "low"


def test_ntrex_reads_in_place(ntrex_path):
    c = load_parallel_dir(ntrex_path, ["eng", "heb", "aze-Latn", "zh"])
    assert c.parallel and set(c.languages) == {"eng", "heb", "aze-Latn", "zho-CN"}
    assert {len(v) for v in c.texts.values()} == {1997}
    assert c.info["heb"].name == "Hebrew"
    with pytest.raises(ValueError, match="available codes"):
        load_parallel_dir(ntrex_path, ["zzz"])


def test_parallel_dir_errors(tmp_path):
    (tmp_path / "newstest2019-src.eng.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "newstest2019-ref.deu.txt").write_text("x\ny\nz\n", encoding="utf-8")
    (tmp_path / "newstest2019-ref.fra.txt").write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(ValueError, match="fra.txt.*line-aligned"):
        load_parallel_dir(tmp_path)
    assert len(load_parallel_dir(tmp_path, ["eng", "deu"])["deu"]) == 3
    (tmp_path / "newstest2019-ref.heb.txt").write_bytes(b"\xff\xfe\xfa bad\n" * 3)
    with pytest.raises(ValueError, match="UTF-8"):
        load_parallel_dir(tmp_path, ["heb"])
    (tmp_path / "newstest2019-ref.spa.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_parallel_dir(tmp_path, ["spa"])
    with pytest.raises(ValueError, match="not a directory"):
        load_parallel_dir(tmp_path / "nope")


def test_text_files(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("one\n\ntwo\n", encoding="utf-8")
    c = load_text_files({"eng": p})
    assert c["eng"] == ["one", "two"]
    q = tmp_path / "y.txt"
    q.write_text("uno\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line count"):
        load_text_files({"eng": p, "spa": q}, parallel=True)
