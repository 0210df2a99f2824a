import re
import sys
import types

import pytest

from empirical.corpora import (RESOURCE_LEVEL, Corpus, LanguageInfo, load_flores, load_parallel_dir,
                               load_text_files, load_udhr, resource_level, split_sentences)

FLORES_KEY = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}(_[A-Z]{2}|_\d{3})?")  # region only on variants


@pytest.fixture(scope="module")
def udhr():
    return load_udhr()


def test_udhr_default_corpus(udhr):
    assert len(udhr) > 700
    assert all(FLORES_KEY.fullmatch(k) for k in udhr.languages)
    assert "heb_Hebr" in udhr.texts and "eng_Latn" in udhr.texts
    sub = load_udhr(["heb", "en", "zho_Hans", "he_Hebr"])
    assert sub.languages == ["heb_Hebr", "eng_Latn", "zho_Hans"]
    info = sub.info["heb_Hebr"]
    assert (info.iso639_3, info.script, info.resource_level, info.source_code) == ("heb", "Hebr", "medium", "he_Hebr")
    for segs in sub.texts.values():
        assert len(segs) >= 3 and all(s.strip() for s in segs)
        # no segment is an excerpt of another
        assert not any(a != b and a in b for a in segs for b in segs)


def test_udhr_every_form_selects_the_same_text(udhr):
    eng = udhr.texts["eng_Latn"]
    for code in ("en", "eng", "eng_Latn", "en_Latn", "EN", "en-US"):
        assert udhr[code] == eng and udhr.key(code) == "eng_Latn" and code in udhr
    assert load_udhr(["en"]).texts == load_udhr(["eng_Latn"]).texts == {"eng_Latn": eng}


def test_udhr_arabic_is_arb(udhr):
    """gflanguages has ar_Arab and arb_Arab; both are arb_Arab, the more populous ar_Arab kept."""
    assert udhr.key("ar") == udhr.key("ara") == udhr.key("arb_Arab") == "arb_Arab"
    assert udhr.info["arb_Arab"].source_code == "ar_Arab"
    assert "arb_Arab" in udhr.extra["merged"]
    assert "ara_Arab" not in udhr.texts


def test_unknown_code_suggests_the_closest(udhr):
    with pytest.raises(ValueError) as e:
        load_udhr(["hebrw"])
    msg = str(e.value)
    assert "'hebrw'" in msg and "heb_Hebr (" in msg
    assert len(re.findall(r"\b[a-z]{3}_[A-Z][a-z]{3}\b", msg)) <= 5  # a few, not 700
    with pytest.raises(ValueError, match="'xx_Nope'"):
        load_udhr(["xx_Nope"])


def test_language_the_corpus_lacks():
    c = load_udhr(["eng", "heb", "srp_Cyrl"])
    with pytest.raises(ValueError) as e:
        c["fr"]
    msg = str(e.value)
    assert "'fr'" in msg and "fra_Latn" in msg and "French" in msg
    # suggestions come from the corpus' own codes
    assert set(re.findall(r"\b[a-z]{3}_[A-Z][a-z]{3}\b", msg.split("closest")[1])) <= {"eng_Latn", "heb_Hebr", "srp_Cyrl"}
    with pytest.raises(ValueError, match="closest codes it has: srp_Cyrl"):
        c["srp_Latn"]
    assert "fr" not in c and None not in c
    with pytest.raises(TypeError, match="must be a str"):
        c[None]


def test_split_sentences():
    assert split_sentences("One. Two! Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    assert split_sentences("一つ。二つ。") == ["一つ。", "二つ。"]


def test_resource_levels():
    assert RESOURCE_LEVEL["eng"] == "high" and RESOURCE_LEVEL["yor"] == "low"
    assert [resource_level(c) for c in ("en", "he_Hebr", "yor_Latn", "ar")] == ["high", "medium", "low", "high"]
    # not in the table: the macrolanguage's level when the code is the member it normalises to
    assert (resource_level("npi_Deva"), resource_level("lvs"), resource_level("khk_Cyrl")) == ("low", "medium", "low")
    assert resource_level("prs") == "unknown"  # Dari is not what fas normalises to (pes)
    assert resource_level("sat_Olck") == "unknown"


def test_ntrex_reads_in_place(ntrex_path):
    c = load_parallel_dir(ntrex_path, ["eng", "heb", "aze-Latn", "zh"])
    assert c.parallel and c.languages == ["eng_Latn", "heb_Hebr", "azj_Latn", "zho_Hans"]
    assert {len(v) for v in c.texts.values()} == {1997}
    assert c.info["heb_Hebr"].name == "Hebrew" and c.info["heb_Hebr"].source_code == "heb"
    assert c.info["zho_Hans"].source_code == "zho-CN"
    with pytest.raises(ValueError, match="'zzz'"):
        load_parallel_dir(ntrex_path, ["zzz"])


def test_ntrex_every_form_selects_the_same_text(ntrex_path):
    src = (ntrex_path / "newstest2019-src.eng.txt").read_text(encoding="utf-8-sig").split("\n")[0]
    texts = [load_parallel_dir(ntrex_path, [code])[code] for code in ("en", "eng", "eng_Latn")]
    assert texts[0] == texts[1] == texts[2] and texts[0][0] == src


def test_ntrex_all_languages_flores_style(ntrex_path):
    c = load_parallel_dir(ntrex_path)
    assert len(c) == 116 and all(FLORES_KEY.fullmatch(k) for k in c.languages)
    # regional variants keep their region; the source English keeps the plain code
    assert {k for k in c.languages if k.startswith("eng_")} == {"eng_Latn", "eng_Latn_GB", "eng_Latn_IN", "eng_Latn_US"}
    assert c.info["eng_Latn"].source_code == "eng" and c.key("en-GB") == c.key("eng-GB") == "eng_Latn_GB"
    assert c.key("zh-TW") == c.key("zho-TW") == "zho_Hant"
    assert c.key("fa") == "pes_Arab" and c.key("prs") == "prs_Arab" and c.key("ms") == "zsm_Latn"
    # the script is read from the text where the file name names none and the default is wrong:
    # NTREX's Hassaniyya and Shilha are in Arabic script (CLDR/gflanguages: Latn, Tfng)
    assert c.key("mey") == "mey_Arab" and c.key("shi") == "shi_Arab"
    assert c.info["srp_Latn"].source_code == "srp-Latn" and c.info["srp_Cyrl"].script == "Cyrl"


def test_parallel_dir_errors(tmp_path):
    (tmp_path / "newstest2019-src.eng.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "newstest2019-ref.deu.txt").write_text("x\ny\nz\n", encoding="utf-8")
    (tmp_path / "newstest2019-ref.fra.txt").write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(ValueError, match="fra.txt.*line-aligned"):
        load_parallel_dir(tmp_path)
    c = load_parallel_dir(tmp_path, ["eng", "de"])
    assert c.languages == ["eng_Latn", "deu_Latn"] and len(c["deu"]) == 3
    (tmp_path / "newstest2019-ref.heb.txt").write_bytes(b"\xff\xfe\xfa bad\n" * 3)
    with pytest.raises(ValueError, match="UTF-8"):
        load_parallel_dir(tmp_path, ["heb"])
    (tmp_path / "newstest2019-ref.spa.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_parallel_dir(tmp_path, ["spa"])
    with pytest.raises(ValueError, match="not a directory"):
        load_parallel_dir(tmp_path / "nope")
    (tmp_path / "de.txt").write_text("x\ny\nz\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'de' and 'deu' both name deu_Latn|'deu' and 'de' both name deu_Latn"):
        load_parallel_dir(tmp_path, ["eng"])


def test_parallel_dir_script_from_text(tmp_path):
    (tmp_path / "newstest2019-ref.mey.txt").write_text("أعضاء البرلماني الويلي\nخايفين الناس\n", encoding="utf-8")
    (tmp_path / "newstest2019-ref.hmn.txt").write_text("Welsh Cov Sawv Cev\nPej Xeem Hauv\n", encoding="utf-8")
    (tmp_path / "newstest2019-ref.shi-Latn.txt").write_text("ⵜⴰⵛⵍⵃⵉⵜ\nⵜⴰⵛⵍⵃⵉⵜ\n", encoding="utf-8")
    c = load_parallel_dir(tmp_path)
    # text decides where the name gives no script; a script in the name is kept as given
    assert set(c.languages) == {"mey_Arab", "hmn_Latn", "shi_Latn"}


def test_text_files(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("one\n\ntwo\n", encoding="utf-8")
    c = load_text_files({"eng": p})
    assert c.languages == ["eng_Latn"] and c["eng"] == c["en"] == ["one", "two"]
    q = tmp_path / "y.txt"
    q.write_text("uno\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line count"):
        load_text_files({"eng": p, "spa": q}, parallel=True)
    with pytest.raises(ValueError, match="both name eng_Latn"):
        load_text_files({"en": p, "eng_Latn": q})
    with pytest.raises(ValueError, match="unknown language code 'englsh'.*eng_Latn"):
        load_text_files({"englsh": p})


def test_hand_built_corpus_accepts_every_form():
    """A Corpus keyed by the caller's own codes (as tests and scripts build them) still resolves."""
    c = Corpus("t", {"eng": ["a"], "heb": ["b"]}, {k: LanguageInfo(k, k) for k in ("eng", "heb")})
    assert c["en"] == c["eng_Latn"] == ["a"] and c.key("he_Hebr") == "heb"
    assert c.select(["he", "en", "eng"]).languages == ["heb", "eng"]


def test_load_flores_configs_and_keys(monkeypatch):
    """FLORES configs are asked as written when FLORES style, else normalised; keys normalised."""
    asked = []

    class _DS:
        column_names = ["id", "text"]

        def __init__(self, config):
            self.config = config

        def __getitem__(self, col):
            return [f"{self.config} {i}" for i in range(3)]

    def load_dataset(dataset, config, split):
        asked.append((dataset, config, split))
        return _DS(config)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = load_flores(["he", "cmn_Hans", "eng_Latn"], split="dev", dataset="x/flores")
    assert [a[1] for a in asked] == ["heb_Hebr", "cmn_Hans", "eng_Latn"]
    assert c.languages == ["heb_Hebr", "zho_Hans", "eng_Latn"] and c.parallel
    assert c["zh"] == ["cmn_Hans 0", "cmn_Hans 1", "cmn_Hans 2"]
    with pytest.raises(ValueError, match="'hebrw'.*heb_Hebr"):
        load_flores(["hebrw"])
