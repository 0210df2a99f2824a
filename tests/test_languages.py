"""empirical.languages: one FLORES-style code for every accepted spelling (docs/design.md,
"Language codes"). The expected codes below are written by hand from ISO 639-1/639-3, ISO 15924
and the FLORES-200 language list, not computed by the module under test."""

import re

import pytest

from empirical import languages as L

# input -> (FLORES-style code, ISO 639-1, ISO 639-3, script)
TABLE = {
    "en": ("eng_Latn", "en", "eng", "Latn"),
    "eng": ("eng_Latn", "en", "eng", "Latn"),
    "eng_Latn": ("eng_Latn", "en", "eng", "Latn"),
    "en_Latn": ("eng_Latn", "en", "eng", "Latn"),        # gflanguages id
    "EN-gb": ("eng_Latn", "en", "eng", "Latn"),          # BCP 47, region dropped
    "he": ("heb_Hebr", "he", "heb", "Hebr"),
    "iw": ("heb_Hebr", "he", "heb", "Hebr"),             # deprecated ISO 639-1 for Hebrew
    "heb_hebr": ("heb_Hebr", "he", "heb", "Hebr"),
    "zh": ("zho_Hans", "zh", "zho", "Hans"),
    "zh-TW": ("zho_Hant", "zh", "zho", "Hant"),          # the region chooses the script
    "zho-CN": ("zho_Hans", "zh", "zho", "Hans"),         # NTREX file code
    "cmn_Hans": ("zho_Hans", "zh", "zho", "Hans"),       # FLORES-200 names Mandarin zho
    "ja": ("jpn_Jpan", "ja", "jpn", "Jpan"),
    "hi": ("hin_Deva", "hi", "hin", "Deva"),
    "ar": ("arb_Arab", "ar", "arb", "Arab"),             # Modern Standard Arabic, as FLORES-200
    "ara": ("arb_Arab", "ar", "arb", "Arab"),
    "arb": ("arb_Arab", "ar", "arb", "Arab"),
    "ru": ("rus_Cyrl", "ru", "rus", "Cyrl"),
    "fr": ("fra_Latn", "fr", "fra", "Latn"),
    "de": ("deu_Latn", "de", "deu", "Latn"),
    "ger": ("deu_Latn", "de", "deu", "Latn"),            # ISO 639-2/B
    "ko": ("kor_Hang", "ko", "kor", "Hang"),             # FLORES-200 writes kor_Hang (CLDR: Kore)
    "el": ("ell_Grek", "el", "ell", "Grek"),
    "th": ("tha_Thai", "th", "tha", "Thai"),
    "ka": ("kat_Geor", "ka", "kat", "Geor"),
    "am": ("amh_Ethi", "am", "amh", "Ethi"),
    "fa": ("pes_Arab", "fa", "pes", "Arab"),             # Western Persian, as FLORES-200
    "prs": ("prs_Arab", None, "prs", "Arab"),            # Dari: fa means pes, so no 639-1 code
    "sw": ("swh_Latn", "sw", "swh", "Latn"),
    "ms": ("zsm_Latn", "ms", "zsm", "Latn"),
    "ne": ("npi_Deva", "ne", "npi", "Deva"),
    "ps": ("pbt_Arab", "ps", "pbt", "Arab"),
    "lv": ("lvs_Latn", "lv", "lvs", "Latn"),
    "et": ("est_Latn", "et", "est", "Latn"),             # FLORES-200 keeps the macrolanguage
    "tl": ("tgl_Latn", "tl", "tgl", "Latn"),             # ISO's Tagalog, not CLDR's fil
    "fil": ("fil_Latn", None, "fil", "Latn"),
    "sr-Latn": ("srp_Latn", "sr", "srp", "Latn"),
    "sr": ("srp_Cyrl", "sr", "srp", "Cyrl"),
    "yo": ("yor_Latn", "yo", "yor", "Latn"),
    "yue": ("yue_Hant", None, "yue", "Hant"),
    "uz-Cyrl": ("uzn_Cyrl", "uz", "uzn", "Cyrl"),
}


@pytest.mark.parametrize("code", list(TABLE))
def test_hand_written_table(code):
    flores, two, three, sc = TABLE[code]
    assert L.normalize(code) == flores
    assert (L.iso639_1(code), L.iso639_3(code), L.script(code)) == (two, three, sc)


def test_names():
    assert [L.name(c) for c in ("en", "heb", "zho_Hans", "zho_Hant", "srp_Latn", "srp_Cyrl", "arb", "tl")] == [
        "English", "Hebrew", "Chinese", "Chinese (Traditional)", "Serbian (Latin)", "Serbian",
        "Standard Arabic", "Tagalog"]


def test_macrolanguage():
    assert (L.macrolanguage("arb"), L.macrolanguage("zsm_Latn"), L.macrolanguage("npi")) == ("ara", "msa", "nep")
    assert L.macrolanguage("eng") is None


def test_every_flores_code_is_its_own_normal_form():
    assert len(L.FLORES200) == len(set(L.FLORES200)) == 204
    assert all(re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", c) for c in L.FLORES200)
    assert [c for c in L.FLORES200 if L.normalize(c) != c] == []
    # the bare language code lands on a FLORES-200 code of that language
    for c in L.FLORES200:
        n = L.normalize(c[:3])
        assert n in L.FLORES200 and n[:3] == c[:3], (c, n)


def test_flores_list_against_the_nllb_tokenizer():
    """An independent copy of the list: transformers' NLLB codes (202; sat_Beng for sat_Olck,
    no arb_Latn, no min_Arab)."""
    nllb = pytest.importorskip("transformers.models.nllb.tokenization_nllb")
    assert set(L.FLORES200) ^ set(nllb.FAIRSEQ_LANGUAGE_CODES) == {"arb_Latn", "min_Arab", "sat_Olck", "sat_Beng"}


@pytest.mark.parametrize("code", ["en", "heb", "zh-TW", "ar", "fa", "tl", "sr-Latn", "ko", "ms", "yue",
                                  "cmn", "sw", "pt-BR"])
def test_round_trips(code):
    n = L.normalize(code)
    assert L.normalize(n) == n
    assert L.normalize(f"{L.iso639_3(n)}_{L.script(n)}") == n
    two = L.iso639_1(n)
    if two is not None:  # the 639-1 code names the same language (the script may be its default)
        assert L.iso639_3(two) == L.iso639_3(n)
        assert L.normalize(f"{two}-{L.script(n)}") == n


def test_iso639_1_round_trip_over_flores():
    for c in L.FLORES200:
        two = L.iso639_1(c)
        if two is not None:
            assert len(two) == 2 and L.iso639_3(two) == c[:3], (c, two)
    covered = sum(L.iso639_1(c) is not None for c in L.FLORES200)
    assert covered > 100  # most FLORES languages have a 639-1 code


@pytest.mark.parametrize("query, first", [("englsh", "eng_Latn"), ("hebrw", "heb_Hebr"),
                                          ("eng_latin", "eng_Latn"), ("chinese", "zho_Hans"),
                                          ("Hebrew", "heb_Hebr")])
def test_unknown_code_suggests_the_closest_few(query, first):
    with pytest.raises(ValueError) as e:
        L.normalize(query)
    msg = str(e.value)
    assert repr(query) in msg and f"{first} (" in msg
    assert L.suggest(query)[0] == first
    # a few suggestions, never the list of every code
    assert len(re.findall(r"\b[a-z]{3}_[A-Z][a-z]{3}\b", msg)) <= 5


def test_suggest_among_given_codes():
    assert L.suggest("srp_Latn", ["eng_Latn", "srp_Cyrl", "hrv_Latn"])[0] == "srp_Cyrl"
    assert L.suggest("englsh", ["heb_Hebr", "eng_Latn_GB", "eng_Latn"])[:2] == ["eng_Latn", "eng_Latn_GB"]
    assert L.suggest("qqqqqq", ["heb_Hebr", "eng_Latn"]) == []


@pytest.mark.parametrize("bad, exc, match", [
    (None, TypeError, "must be a str, got NoneType"),
    (5, TypeError, "must be a str, got int"),
    (b"en", TypeError, "got bytes"),
    ("", ValueError, "empty language code"),
    ("   ", ValueError, "empty language code"),
    ("und", ValueError, "no single language"),
    ("mul", ValueError, "no single language"),
    ("eng_Nope", ValueError, "unknown script 'Nope'"),
    ("xx", ValueError, "unknown language code 'xx'"),
    ("zzz", ValueError, "unknown language code 'zzz'"),
    ("qaa", ValueError, "unknown language code 'qaa'"),  # private use: no language
    ("en--", ValueError, "unknown language code"),
])
def test_bad_input_is_refused_clearly(bad, exc, match):
    with pytest.raises(exc, match=match):
        L.normalize(bad)


def test_text_script():
    assert L.text_script(["שלום עולם", "זה טקסט"]) == "Hebr"
    assert L.text_script(["これは日本語の文です。"]) == "Jpan"       # kana among the Han
    assert L.text_script(["这是一个句子。"]) == "Hani"               # Han alone
    assert L.text_script(["한국어 문장입니다"]) == "Hang"
    assert L.text_script(["Welsh AMs أعضاء البرلماني الويلي خايفين الناس"]) == "Arab"
    assert L.text_script(["123 ... !!"]) is None
    # the expected script is confirmed when it holds half the letters, composites included
    assert L.text_script(["这是一个句子。"], expected="Hans") == "Hans"
    assert L.text_script(["abc def", "αβγ"], expected="Latn") == "Latn"
    assert L.text_script(["αβγδεζ abc"], expected="Latn") == "Grek"
