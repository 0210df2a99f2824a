"""Language codes: one convention, FLORES-200 style (docs/design.md, "Language codes").

Every language in results, caches and JSON is named ``<ISO 639-3>_<ISO 15924 script>``, e.g.
``eng_Latn``, ``heb_Hebr``, ``zho_Hans``. :func:`normalize` turns any accepted spelling into that
form:

==============================  ==================  ===========================================
input                           example             becomes
==============================  ==================  ===========================================
ISO 639-1                       ``he``, ``zh-TW``   ``heb_Hebr``, ``zho_Hant``
ISO 639-3 (or 639-2/B)          ``heb``, ``ger``    ``heb_Hebr``, ``deu_Latn``
FLORES style / gflanguages id   ``heb_Hebr``,       ``heb_Hebr``
                                ``he_Hebr``
BCP 47 tag with a region        ``pt-BR``,          ``por_Latn``, ``zho_Hans`` (the region only
                                ``zho-CN``          chooses the script; FLORES names no region)
==============================  ==================  ===========================================

The ISO 639-1 -> 639-3 mapping, the validity of a code, the likely script of a language
(Unicode CLDR likely subtags: ``Language.get(code).maximize().script``), macrolanguage
membership and the names all come from ``langcodes`` (IANA subtag registry and CLDR data) with
``language-data`` for the names; nothing here is a hand-written ISO table. Two rules are the
project's own:

1. **The ISO 639-3 code is the one the input names.** A three-letter code is kept (``tgl`` stays
   Tagalog, ``prs`` stays Dari, although CLDR folds them into ``fil`` and ``fa-AF``); a
   two-letter code becomes its ISO 639-2/T code (``tl`` -> ``tgl``, ``iw`` -> ``heb``); an ISO
   639-2/B code becomes the T code (``ger`` -> ``deu``).
2. **Macrolanguages are named as FLORES-200 names them.** Where FLORES-200 (the list
   :data:`FLORES200`) names a language only by an individual member of its macrolanguage, the
   macrolanguage code becomes that member: the one CLDR calls dominant, else the only member
   FLORES-200 has. So ``ar``/``ara`` -> ``arb_Arab`` (Modern Standard Arabic, as in FLORES-200),
   ``fa`` -> ``pes_Arab``, ``ms`` -> ``zsm_Latn``, ``sw`` -> ``swh_Latn``, ``lv`` -> ``lvs_Latn``,
   ``uz`` -> ``uzn_Latn``, ``ne`` -> ``npi_Deva``, ``ps`` -> ``pbt_Arab``. Conversely a dominant
   member of a macrolanguage that FLORES-200 names by the macrolanguage code becomes that code:
   ``cmn_Hans`` -> ``zho_Hans``, ``ekk`` -> ``est_Latn``. A macrolanguage with several
   FLORES-200 members and no dominant one keeps its own code (``no`` -> ``nor_Latn``; ``nob`` and
   ``nno`` stay themselves). Every FLORES-200 code normalises to itself.

When the input names no script, the script is CLDR's likely script of the language; where CLDR
has none, the script of the language's most populous entry in ``gflanguages``; where neither
knows, the code is refused and the message asks for the script. A text can be checked against
its script with :func:`text_script` (the corpus loaders do).

Unknown codes raise ``ValueError`` naming the code and the closest known codes
(:func:`suggest`), never a list of every code.

>>> normalize("he"), normalize("eng"), normalize("zh-TW"), normalize("ar")
('heb_Hebr', 'eng_Latn', 'zho_Hant', 'arb_Arab')
>>> iso639_1("heb_Hebr"), iso639_3("he"), script("ja"), name("zho_Hant")
('he', 'heb', 'Jpan', 'Chinese (Traditional)')
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

try:
    import langcodes
    # CLDR likely subtags, macrolanguage membership, ISO 639-1 -> 639-2/T codes and the script
    # list, as langcodes ships them; its public API has no accessor for these tables.
    from langcodes.data_dicts import (ALL_SCRIPTS, LANGUAGE_ALPHA3, LIKELY_SUBTAGS, MACROLANGUAGES,
                                      NORMALIZED_MACROLANGUAGES)
except ImportError as exc:  # pragma: no cover - a dependency of the project
    raise ImportError("empirical.languages needs 'langcodes' and 'language-data' "
                      "(pip install langcodes language-data)") from exc

__all__ = ["FLORES200", "Tag", "parse", "normalize", "iso639_1", "iso639_3", "script", "name",
           "macrolanguage", "suggest", "describe_suggestions", "text_script"]

# The 204 language-script codes of FLORES-200 (NLLB Team 2022, "No Language Left Behind",
# the dataset's README). transformers' NLLB tokenizer lists 202 of them (it has sat_Beng where
# the dataset has sat_Olck, and lacks arb_Latn and min_Arab); tests/test_languages.py compares.
FLORES200: tuple[str, ...] = tuple("""
ace_Arab ace_Latn acm_Arab acq_Arab aeb_Arab afr_Latn ajp_Arab aka_Latn amh_Ethi apc_Arab arb_Arab
arb_Latn ars_Arab ary_Arab arz_Arab asm_Beng ast_Latn awa_Deva ayr_Latn azb_Arab azj_Latn bak_Cyrl
bam_Latn ban_Latn bel_Cyrl bem_Latn ben_Beng bho_Deva bjn_Arab bjn_Latn bod_Tibt bos_Latn bug_Latn
bul_Cyrl cat_Latn ceb_Latn ces_Latn cjk_Latn ckb_Arab crh_Latn cym_Latn dan_Latn deu_Latn dik_Latn
dyu_Latn dzo_Tibt ell_Grek eng_Latn epo_Latn est_Latn eus_Latn ewe_Latn fao_Latn fij_Latn fin_Latn
fon_Latn fra_Latn fur_Latn fuv_Latn gaz_Latn gla_Latn gle_Latn glg_Latn grn_Latn guj_Gujr hat_Latn
hau_Latn heb_Hebr hin_Deva hne_Deva hrv_Latn hun_Latn hye_Armn ibo_Latn ilo_Latn ind_Latn isl_Latn
ita_Latn jav_Latn jpn_Jpan kab_Latn kac_Latn kam_Latn kan_Knda kas_Arab kas_Deva kat_Geor kaz_Cyrl
kbp_Latn kea_Latn khk_Cyrl khm_Khmr kik_Latn kin_Latn kir_Cyrl kmb_Latn kmr_Latn knc_Arab knc_Latn
kon_Latn kor_Hang lao_Laoo lij_Latn lim_Latn lin_Latn lit_Latn lmo_Latn ltg_Latn ltz_Latn lua_Latn
lug_Latn luo_Latn lus_Latn lvs_Latn mag_Deva mai_Deva mal_Mlym mar_Deva min_Arab min_Latn mkd_Cyrl
mlt_Latn mni_Beng mos_Latn mri_Latn mya_Mymr nld_Latn nno_Latn nob_Latn npi_Deva nso_Latn nus_Latn
nya_Latn oci_Latn ory_Orya pag_Latn pan_Guru pap_Latn pbt_Arab pes_Arab plt_Latn pol_Latn por_Latn
prs_Arab quy_Latn ron_Latn run_Latn rus_Cyrl sag_Latn san_Deva sat_Olck scn_Latn shn_Mymr sin_Sinh
slk_Latn slv_Latn smo_Latn sna_Latn snd_Arab som_Latn sot_Latn spa_Latn als_Latn srd_Latn srp_Cyrl
ssw_Latn sun_Latn swe_Latn swh_Latn szl_Latn tam_Taml taq_Latn taq_Tfng tat_Cyrl tel_Telu tgk_Cyrl
tgl_Latn tha_Thai tir_Ethi tpi_Latn tsn_Latn tso_Latn tuk_Latn tum_Latn tur_Latn twi_Latn tzm_Tfng
uig_Arab ukr_Cyrl umb_Latn urd_Arab uzn_Latn vec_Latn vie_Latn war_Latn wol_Latn xho_Latn ydd_Hebr
yor_Latn yue_Hant zho_Hans zho_Hant zsm_Latn zul_Latn""".split())

# Codes that name no single language (BCP 47 / ISO 639 special codes).
_NOT_A_LANGUAGE = {"und": "undetermined", "mul": "multiple languages", "mis": "uncoded languages",
                   "zxx": "no linguistic content"}


@dataclass(frozen=True)
class Tag:
    """A parsed language code: ISO 639-3 language, ISO 15924 script, optional ISO 3166 region.

    ``code`` is the FLORES-style name; the region (``GB`` of ``en-GB``) is kept apart, because
    FLORES names none, for corpora that hold several regional variants of one language.
    ``script_named`` says whether the input named the script (else it is the default one).
    """

    language: str
    script: str
    region: str | None = None
    script_named: bool = field(default=False, compare=False)

    @property
    def code(self) -> str:
        return f"{self.language}_{self.script}"

    def __str__(self) -> str:
        return self.code


def parse(code: str) -> Tag:
    """The :class:`Tag` of ``code`` (any form :func:`normalize` accepts).

    Raises
    ------
    TypeError
        ``code`` is not a str.
    ValueError
        Empty, unknown, not a single language, or no script known (the message says which and
        suggests the closest known codes).
    """
    if not isinstance(code, str):
        raise TypeError(f"a language code must be a str, got {type(code).__name__} {code!r}")
    text = code.strip()
    if not text:
        raise ValueError("empty language code; give e.g. 'eng_Latn', 'eng' or 'en'")
    return _parse(text)


def normalize(code: str) -> str:
    """The FLORES-style code ``<ISO 639-3>_<ISO 15924 script>`` of ``code``.

    Accepts ISO 639-1 (``he``), ISO 639-3 (``heb``), FLORES-style codes (``heb_Hebr``),
    gflanguages ids (``he_Hebr``) and BCP 47 tags (``zh-TW``, ``sr-Latn``), in any letter case,
    with ``_`` or ``-`` between the parts. See the module docstring for the rules.

    >>> [normalize(c) for c in ("en", "eng", "eng_Latn", "en_Latn", "hi", "ja", "zh", "ar")]
    ['eng_Latn', 'eng_Latn', 'eng_Latn', 'eng_Latn', 'hin_Deva', 'jpn_Jpan', 'zho_Hans', 'arb_Arab']
    """
    return parse(code).code


def iso639_3(code: str) -> str:
    """The ISO 639-3 part of ``normalize(code)`` (``he`` -> ``heb``, ``ar`` -> ``arb``)."""
    return parse(code).language


def script(code: str) -> str:
    """The ISO 15924 script of ``normalize(code)`` (``ja`` -> ``Jpan``, ``zh-TW`` -> ``Hant``)."""
    return parse(code).script


def iso639_1(code: str) -> str | None:
    """The ISO 639-1 code that normalises to the language of ``code``, or None if there is none.

    ``heb_Hebr`` -> ``he``; ``arb_Arab`` -> ``ar`` (``ar`` normalises to ``arb``); ``prs_Arab``
    (Dari) -> None, because ``fa`` normalises to ``pes`` (Western Persian).
    """
    return _two_letter_codes().get(parse(code).language)


def macrolanguage(code: str) -> str | None:
    """ISO 639-3 code of the macrolanguage the language of ``code`` belongs to, or None.

    ``arb`` -> ``ara``, ``zsm`` -> ``msa``, ``npi`` -> ``nep``; ``eng`` -> None.
    """
    return _macrolanguage3(parse(code).language)


def name(code: str) -> str:
    """English display name: the language, plus the script where it is not the one the language
    gets by default (``Chinese``, ``Chinese (Traditional)``, ``Serbian (Latin)``)."""
    tag = parse(code)
    base = _language_name(tag.language)
    if tag.script != _default_script(tag.language):
        base += f" ({langcodes.Language.make(script=tag.script).script_name()})"
    return base


def suggest(code: object, available: Iterable[str] | None = None, n: int = 5) -> list[str]:
    """The ``n`` codes of ``available`` (default :data:`FLORES200`) closest to ``code``.

    Closeness is difflib's ratio between the lower-cased query and each candidate's FLORES code,
    ISO 639-3 and 639-1 codes and English name, best first; candidates with ratio below 0.5 are
    left out, so the list can be empty. Codes of ``available`` that do not parse are compared by
    their spelling only.
    """
    q = str(code).strip().lower().replace("-", "_")
    scored = []
    for cand in dict.fromkeys(available if available is not None else FLORES200):
        forms = _forms(cand)
        score = max(difflib.SequenceMatcher(None, q, f).ratio() for f in forms)
        if q and any(f.split("_")[0] == q.split("_")[0] for f in forms if "_" in f):
            score = max(score, 0.9)  # same language, other script or region
        if score >= 0.5:
            scored.append((-score, cand))
    return [c for _, c in sorted(scored)[:n]]


def describe_suggestions(codes: Sequence[str]) -> str:
    """``'eng_Latn (English), ...'`` for an error message; a hint when ``codes`` is empty."""
    if not codes:
        return "no close match (codes look like 'eng_Latn', 'eng' or 'en')"
    out = []
    for c in codes:
        try:
            out.append(f"{c} ({name(c)})")
        except (TypeError, ValueError):
            out.append(c)
    return ", ".join(out)


# ---- scripts of texts -----------------------------------------------------------------------------

# FLORES script codes that are not Unicode script property values: the Unicode scripts they
# consist of (Unicode UAX #24; ISO 15924 defines Jpan = Han + Hiragana + Katakana,
# Kore = Hangul + Han, Hans/Hant = Han).
_COMPOSITE = {"Jpan": ("Hani", "Hira", "Kana"), "Kore": ("Hang", "Hani"), "Hans": ("Hani",),
              "Hant": ("Hani",)}


def text_script(texts: Iterable[str], expected: str | None = None, max_letters: int = 5000) -> str | None:
    """The ISO 15924 script most letters of ``texts`` are written in; None without letters.

    With ``expected`` (a script code), returns ``expected`` when at least half the letters are
    in it (``Jpan``, ``Kore``, ``Hans``, ``Hant`` count their Han, kana and Hangul letters), so
    the common case costs one pass. Otherwise every Unicode script is counted; Han text with
    kana is ``Jpan``, with Hangul ``Kore``, alone ``Hani`` (Simplified and Traditional are not
    told apart). Only the first ``max_letters`` letters are read.
    """
    chunks, n = [], 0
    for t in texts:
        chunks.append(t)
        n += len(t)
        if n >= 4 * max_letters:
            break
    sample = _pattern(r"\P{L}+").sub("", "".join(chunks))[:max_letters]
    if not sample:
        return None

    def count(sc: str) -> int:
        parts = _COMPOSITE.get(sc, (sc,))
        return len(_pattern("[" + "".join(fr"\p{{sc={p}}}" for p in parts) + "]").findall(sample))

    if expected is not None and _known_script(expected) and count(expected) >= 0.5 * len(sample):
        return expected
    counts = {sc: count(sc) for sc in _unicode_scripts()}
    best = max(counts, key=counts.get)
    if best in ("Hani", "Hira", "Kana", "Hang"):
        kana, hangul = counts["Hira"] + counts["Kana"], counts["Hang"]
        if kana > 0.05 * len(sample):
            return "Jpan"
        if hangul > 0.05 * len(sample):
            return "Kore" if counts["Hani"] > 0.05 * len(sample) else "Hang"
        return "Hani"
    return best


@functools.lru_cache(maxsize=1024)
def _pattern(pat: str):
    import regex

    return regex.compile(pat)


@functools.lru_cache(maxsize=512)
def _known_script(sc: str) -> bool:
    """An ISO 15924 code the IANA registry lists, or a Unicode script property value."""
    import regex

    if sc in ALL_SCRIPTS or sc in _COMPOSITE:
        return True
    try:
        regex.compile(fr"\p{{sc={sc}}}")
    except regex.error:
        return False
    return True


@functools.cache
def _unicode_scripts() -> frozenset[str]:
    """The ISO 15924 codes that are Unicode script property values (those ``regex`` knows)."""
    import regex

    out = set()
    for sc in ALL_SCRIPTS:
        try:
            regex.compile(fr"\p{{sc={sc}}}")
        except regex.error:
            continue
        out.add(sc)
    return frozenset(out - {"Zyyy", "Zinh", "Zzzz"})


# ---- internals ------------------------------------------------------------------------------------

def _unknown(code: str) -> ValueError:
    return ValueError(f"unknown language code {code!r}; closest known codes: "
                      f"{describe_suggestions(suggest(code))}")


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> Tag:
    tag = text.replace("_", "-")
    if tag.split("-")[0].lower() in _NOT_A_LANGUAGE:
        first = tag.split("-")[0].lower()
        raise ValueError(f"{text!r} names no single language ({_NOT_A_LANGUAGE[first]}); "
                         "give one language, e.g. 'eng_Latn'")
    try:
        raw = langcodes.Language.get(tag, normalize=False)
        norm = langcodes.Language.get(tag)
    except langcodes.LanguageTagError:
        raise _unknown(text) from None
    if raw.language is None or norm.language is None:
        raise _unknown(text)
    lang3 = _language3(raw.language, norm)
    # Validity of the language, region and variants from the IANA registry; a script is valid
    # when the registry or Unicode (newer scripts: Nagm, Todr, ...) knows it.
    if (not langcodes.Language.make(language=norm.language, territory=norm.territory,
                                    variants=norm.variants).is_valid()
            or _language_name(lang3).startswith("Unknown language")):
        raise _unknown(text)
    if norm.script is not None and not _known_script(norm.script):
        raise ValueError(f"unknown script {norm.script!r} in language code {text!r}; scripts are "
                         "ISO 15924 codes such as Latn, Arab, Hebr, Hans")
    flores3 = _flores_language_map().get(lang3, lang3)
    sc = norm.script or _default_script(flores3, lang3, str(norm))
    if sc is None:
        raise ValueError(f"no script is known for {text!r} ({_language_name(lang3)}); name it, "
                         f"e.g. '{flores3}_Latn' or '{flores3}_Arab'")
    return Tag(flores3, sc, norm.territory, norm.script is not None)


def _language3(subtag: str, norm: "langcodes.Language") -> str:
    """ISO 639-3 code of a language subtag as the input wrote it (module docstring, rule 1)."""
    subtag = subtag.lower()
    if len(subtag) == 3:
        try:  # an ISO 639-2/B code (ger, fre, chi): its T code
            if norm.to_alpha3("B") == subtag != norm.to_alpha3("T"):
                return norm.to_alpha3("T")
        except LookupError:
            pass
        return subtag
    try:
        return langcodes.Language.get(subtag, normalize=False).to_alpha3()
    except LookupError:
        return subtag


def _cldr_script(tag: str) -> str | None:
    """CLDR's likely script of ``tag``, or None when CLDR has no entry for its language.

    ``maximize()`` falls back to 'und' (English, Latin) when CLDR knows nothing of the language:
    that is no evidence about its script, so only a language-specific entry counts.
    """
    lang = langcodes.Language.get(tag)
    if any(t in LIKELY_SUBTAGS for t in lang.broader_tags() if not t.startswith("und")):
        return lang.maximize().script
    return None


@functools.lru_cache(maxsize=4096)
def _default_script(flores3: str, lang3: str | None = None, tag: str | None = None) -> str | None:
    """The script of a language when the code names none, first rule that applies:

    1. CLDR's likely script for the tag's region, where the region changes it (``zh-TW``: Hant,
       ``sr-ME``: Latn);
    2. the script FLORES-200 writes the language in, where it uses one (``kor``: Hang, where
       CLDR says Kore; ``crh``: Latn; ``pbt``: Arab);
    3. CLDR's likely script of the language, then of its macrolanguage (``ayl``: Arab);
    4. the script of the language's most populous gflanguages entry (``hmn``: Latn).
    """
    lang3 = lang3 or flores3
    base = _cldr_script(lang3)
    if tag is not None:
        regional = _cldr_script(tag)
        if regional is not None and regional != base:
            return regional
    flores = [c.split("_")[1] for c in FLORES200 if c.startswith(flores3 + "_")]
    if len(flores) == 1:
        return flores[0]
    if base is None and flores3 != lang3:
        base = _cldr_script(flores3)
    if base is None:
        macro = _macrolanguage3(lang3)
        base = _cldr_script(macro) if macro else None
    return base or _gflanguages_scripts().get(lang3)


@functools.cache
def _gflanguages_scripts() -> dict[str, str]:
    """ISO 639-3 -> script of the language's most populous gflanguages entry."""
    import gflanguages

    best: dict[str, tuple[int, str]] = {}
    for lang in gflanguages.LoadLanguages().values():
        try:
            l3 = langcodes.Language.get(lang.language, normalize=False).to_alpha3()
        except (LookupError, langcodes.LanguageTagError):
            continue
        if lang.script and (l3 not in best or lang.population > best[l3][0]):
            best[l3] = (int(lang.population), lang.script)
    return {k: v[1] for k, v in best.items()}


@functools.lru_cache(maxsize=4096)
def _language_name(lang3: str) -> str:
    """English name of an ISO 639-3 code, preferring the name of the code itself (``arb``:
    Standard Arabic, ``tgl``: Tagalog) over that of its CLDR replacement."""
    candidates = [langcodes.Language.get(lang3, normalize=False)]
    two = _alpha2_by_alpha3().get(lang3)
    if two:
        candidates.append(langcodes.Language.get(two, normalize=False))
    candidates.append(langcodes.Language.get(lang3))
    names = [c.language_name() for c in candidates]
    return next((n for n in names if not n.startswith("Unknown language")), names[-1])


@functools.cache
def _alpha2_by_alpha3() -> dict[str, str]:
    """ISO 639-2/T code -> ISO 639-1 code (the canonical one where two share a language)."""
    out: dict[str, str] = {}
    for two, three in LANGUAGE_ALPHA3.items():
        if len(two) == 2 and len(three) == 3:
            canonical = langcodes.Language.get(two).language == two
            if three not in out or canonical:
                out[three] = two
    return out


@functools.cache
def _two_letter_codes() -> dict[str, str]:
    """Normalised ISO 639-3 language -> the ISO 639-1 code that normalises to it."""
    out: dict[str, str] = {}
    for three, two in _alpha2_by_alpha3().items():
        try:
            lang = _parse(two).language
        except ValueError:
            continue
        # Where two 639-1 codes normalise to one language, the one whose own code it is wins.
        if lang not in out or lang == three:
            out[lang] = two
    return out


def _alpha3(subtag: str) -> str | None:
    try:
        return langcodes.Language.get(subtag, normalize=False).to_alpha3()
    except (LookupError, langcodes.LanguageTagError):
        return None


@functools.lru_cache(maxsize=4096)
def _macrolanguage3(lang3: str) -> str | None:
    short = langcodes.Language.get(lang3).language
    m = MACROLANGUAGES.get(short) or MACROLANGUAGES.get(lang3)
    return _alpha3(m) if m else None


@functools.cache
def _flores_language_map() -> dict[str, str]:
    """ISO 639-3 -> the ISO 639-3 code FLORES-200 names that language by (module docstring,
    rule 2); only codes that change are listed."""
    flores = {c.split("_")[0] for c in FLORES200}
    dominant = {}  # individual language (639-3) -> its macrolanguage (639-3), where CLDR calls it dominant
    for ind, mac in NORMALIZED_MACROLANGUAGES.items():
        i3, m3 = _alpha3(ind), _alpha3(mac)
        if i3 and m3:
            dominant[i3] = m3
    members: dict[str, list[str]] = {}
    for f in sorted(flores):
        m = _macrolanguage3(f)
        if m and m not in flores:
            members.setdefault(m, []).append(f)
    out = {}
    for m, ms in members.items():
        dom = [f for f in ms if dominant.get(f) == m]
        if len(dom) == 1:
            out[m] = dom[0]
        elif len(ms) == 1:
            out[m] = ms[0]
    for i3, m3 in dominant.items():
        if m3 in flores and i3 not in flores:
            out[i3] = m3
    return out


@functools.lru_cache(maxsize=8192)
def _forms(cand: str) -> tuple[str, ...]:
    """Lower-cased spellings of a candidate code that a query may resemble."""
    forms = [cand.lower().replace("-", "_")]
    try:
        tag = parse(cand)
    except (TypeError, ValueError):
        return tuple(forms)
    forms += [tag.code.lower(), tag.language, _language_name(tag.language).lower(), name(cand).lower()]
    two = iso639_1(cand)
    if two:
        forms.append(two)
    return tuple(dict.fromkeys(forms))
