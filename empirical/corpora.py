"""Multilingual corpora: per-language lists of text segments plus language metadata.

Loaders
-------
* :func:`load_udhr` - the embedded default: UDHR sample text shipped by ``gflanguages``
  (about 2k characters per language, the same articles across languages, not line-aligned).
* :func:`load_parallel_dir` - any folder in the NTREX-128 / FLORES one-file-per-language,
  line-aligned layout (``newstest2019-ref.<code>.txt``, English source
  ``newstest2019-src.eng.txt``, or ``<code>.txt`` / ``<code>.dev`` files).
* :func:`load_flores` - FLORES-200 through ``datasets`` (needs the network; imported lazily).
* :func:`load_text_files` - an explicit ``{code: path}`` mapping.

Language codes
--------------
Every loader names its languages FLORES style, ``<ISO 639-3>_<ISO 15924 script>``
(docs/design.md, "Language codes"; :mod:`empirical.languages`), whatever its source calls them
(``he_Hebr`` in gflanguages, ``heb`` or ``zho-CN`` in NTREX file names), and every method that
takes a language (``corpus[code]``, :meth:`Corpus.select`, the loaders' ``languages``) accepts
any form :func:`empirical.languages.normalize` accepts, or the source's own code. Where a source
code names no script, the script is the language's default one, checked against the text: a
file whose letters are mostly in another script is named by that script (NTREX's Hassaniyya,
``mey``, is written in Arabic script, not the Latin CLDR and gflanguages assume: ``mey_Arab``).

Regional variants of one language that a source keeps apart (NTREX's ``eng``, ``eng-GB``,
``eng-US``) would share a code; the one without a region (else the most populous, else the first
by code) keeps the FLORES code and the others add their region: ``eng_Latn``, ``eng_Latn_GB``,
``eng_Latn_US``. ``corpus["en-GB"]`` finds the variant. Two source entries with one code and no
region to tell them apart are an error in a folder and in :func:`load_text_files`; in UDHR,
whose entries are chosen for us, the most populous is kept (``ar_Arab`` over ``arb_Arab``).

Resource levels
---------------
:data:`RESOURCE_LEVEL` tags common languages ``high`` / ``medium`` / ``low`` following the
taxonomy of Joshi et al. (2020), "The State and Fate of Linguistic Diversity and Inclusion in the
NLP World" (ACL): classes 5-4 -> high, 3 -> medium, 2-0 -> low, keyed by ISO 639-3. A language
not in the table takes its macrolanguage's level (``lvs`` Standard Latvian: ``lav``); languages
found in neither are tagged ``"unknown"``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from empirical import languages as _lang

__all__ = ["Corpus", "LanguageInfo", "RESOURCE_LEVEL", "resource_level", "load_udhr",
           "load_parallel_dir", "load_flores", "load_text_files", "split_sentences"]

# Joshi et al. (2020) classes: 5/4 -> high, 3 -> medium, 2/1/0 -> low (ISO 639-3 codes;
# macrolanguage and common individual codes both listed).
_HIGH = "eng deu fra spa jpn zho cmn ara arb rus por ita nld kor pol ces swe fin hun fas pes tur vie hin"
_MEDIUM = ("heb ind zsm msa ukr bul ell ron cat dan slk slv hrv srp lit lav est ben tha tam urd "
           "kat eus glg afr tgl fil nob nor bos mkd hye kaz uzb aze sqi isl cym bel")
_LOW = ("amh hau yor ibo zul xho swa swh som wol lin kin mri smo ton fij mlg sna nya tsn sot "
        "ssw ven tso orm tir pus kir tgk tuk khm lao mya sin nep mar guj pan kan tel mal ori "
        "asm snd bak tat chv uig gle gla mlt ltz fao bre oci que aym grn hat jav sun mon bod "
        "div dzo kur yid epo lug run nde ewe twi bam kon ckb kmr")
RESOURCE_LEVEL: dict[str, str] = {
    **{c: "low" for c in _LOW.split()}, **{c: "medium" for c in _MEDIUM.split()},
    **{c: "high" for c in _HIGH.split()}}


def resource_level(code: str) -> str:
    """``high`` / ``medium`` / ``low`` per Joshi et al. (2020), else ``unknown``.

    ``code`` is any language code :func:`empirical.languages.normalize` accepts. A language not in
    :data:`RESOURCE_LEVEL` takes the level of its macrolanguage when it is the member the
    macrolanguage normalises to (``npi`` Nepali: ``nep``), not otherwise (``prs`` Dari is not
    ``fas`` Persian, which normalises to ``pes``).
    """
    lang = _lang.iso639_3(code)
    if lang in RESOURCE_LEVEL:
        return RESOURCE_LEVEL[lang]
    macro = _lang.macrolanguage(code)
    if macro in RESOURCE_LEVEL and _lang.iso639_3(macro) == lang:
        return RESOURCE_LEVEL[macro]
    return "unknown"


@dataclass(frozen=True)
class LanguageInfo:
    """Metadata of one language of a corpus.

    Attributes
    ----------
    code : str
        The corpus key: the FLORES-style code (``heb_Hebr``), with a region for a regional
        variant (``eng_Latn_GB``).
    iso639_3 : str
    script : str or None
        ISO 15924 script code (``Latn``, ``Hebr``...), when known.
    name : str or None
    resource_level : str
        ``high``, ``medium``, ``low`` or ``unknown``.
    population : int
        Speakers, where the source says (gflanguages); else 0.
    region : str or None
        ISO 3166 region of a regional variant (``GB``).
    source_code : str or None
        What the source calls the language (``he_Hebr``, ``eng-GB``), when it differs.
    """

    code: str
    iso639_3: str
    script: str | None = None
    name: str | None = None
    resource_level: str = "unknown"
    population: int = 0
    region: str | None = None
    source_code: str | None = None


@dataclass
class Corpus:
    """Per-language text segments with metadata.

    Attributes
    ----------
    name : str
    texts : dict of str to list of str
        Segments (sentences or lines) per language code (FLORES style from every loader).
    info : dict of str to LanguageInfo
    parallel : bool
        True when segment ``i`` is the same content in every language (paired bootstrap by id).
    source : str
    """

    name: str
    texts: dict[str, list[str]]
    info: dict[str, LanguageInfo]
    parallel: bool = False
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def languages(self) -> list[str]:
        return list(self.texts)

    def key(self, code: str) -> str:
        """The key of language ``code`` in :attr:`texts`: ``code`` in any accepted form.

        Raises
        ------
        TypeError
            ``code`` is not a str.
        ValueError
            Not a language code, or a language this corpus does not have; the message names it
            and the closest codes the corpus has.
        """
        return _resolve(code, self.texts, self.info, self.name)

    def __getitem__(self, code: str) -> list[str]:
        return self.texts[self.key(code)]

    def __contains__(self, code: object) -> bool:
        try:
            self.key(code)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        return len(self.texts)

    def n_bytes(self, code: str) -> int:
        """UTF-8 bytes of all segments of ``code``."""
        return sum(len(s.encode("utf-8")) for s in self[code])

    def select(self, languages: Iterable[str]) -> "Corpus":
        """A corpus restricted to ``languages`` (any accepted form), in the order given."""
        keys = list(dict.fromkeys(self.key(c) for c in languages))
        return Corpus(self.name, {k: self.texts[k] for k in keys}, {k: self.info[k] for k in keys},
                      self.parallel, self.source, dict(self.extra))

    def head(self, n: int) -> "Corpus":
        """The first ``n`` segments of every language (keeps alignment)."""
        return Corpus(self.name, {k: v[:n] for k, v in self.texts.items()}, dict(self.info),
                      self.parallel, self.source, dict(self.extra))


def _resolve(code: str, available: Mapping[str, object], info: Mapping[str, LanguageInfo],
             corpus: str = "corpus") -> str:
    """The key of ``available`` that ``code`` names (see :meth:`Corpus.key`)."""
    if not isinstance(code, str):
        raise TypeError(f"a language code must be a str, got {type(code).__name__} {code!r}")
    if code in available:
        return code
    for k, i in info.items():
        if i.source_code == code and k in available:
            return k
    try:
        tag = _lang.parse(code)
    except ValueError as exc:
        if not str(exc).startswith("unknown language code"):
            raise  # empty, no single language, unknown script: the reason is the message
        raise ValueError(f"unknown language code {code.strip()!r}; closest codes in {corpus!r}: "
                         f"{_lang.describe_suggestions(_lang.suggest(code, available))}") from None
    wanted = ([f"{tag.code}_{tag.region}"] if tag.region else []) + [tag.code]
    for w in wanted:
        if w in available:
            return w
    # Keys that are not FLORES style (a Corpus built by hand, keyed "eng"): compare normalised.
    for k in available:
        try:
            if _lang.normalize(k) == tag.code:
                return k
        except ValueError:
            continue
    raise ValueError(f"{corpus!r} has no {code!r} ({tag.code}, {_lang.name(tag.code)}); closest codes "
                     f"it has: {_lang.describe_suggestions(_lang.suggest(tag.code, available))}")


@dataclass(frozen=True)
class _Entry:
    """One language as a source names it, before keys are assigned."""

    source_code: str
    tag: "_lang.Tag"
    population: int = 0


def _assign_keys(entries: Sequence[_Entry], what: str, strict: bool) -> dict[str, _Entry]:
    """FLORES-style key -> entry (module docstring, "Language codes"): variants sharing a code
    are told apart by their region; duplicates without one raise (``strict``) or the most
    populous is kept."""
    groups: dict[str, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.tag.code, []).append(e)
    out: dict[str, _Entry] = {}
    for code, group in groups.items():
        group = sorted(group, key=lambda e: (e.tag.region is not None, -e.population, e.source_code))
        plain, variants = group[0], group[1:]
        out[code] = plain
        for e in variants:
            key = f"{code}_{e.tag.region}" if e.tag.region else None
            if key is None or key in out:
                if strict:
                    raise ValueError(f"{what}: {plain.source_code!r} and {e.source_code!r} both name "
                                     f"{code}; keep one of them")
                continue
            out[key] = e
    return out


def _tag_of_text(source_code: str, sample: Iterable[str]) -> "_lang.Tag":
    """The tag of ``source_code``, its default script replaced by the script the text is in."""
    tag = _lang.parse(source_code)
    if tag.script_named:
        return tag
    found = _lang.text_script(sample, expected=tag.script)
    if found is None or found == tag.script:
        return tag
    language = re.split(r"[-_]", source_code.strip())[0]
    # Han without kana or Hangul is all we can tell of Chinese; the default (Hans/Hant) stays.
    if found == "Hani" and tag.script in ("Hans", "Hant"):
        return tag
    return _lang.parse(f"{language}_{found}" + (f"_{tag.region}" if tag.region else ""))


def _info(key: str, e: _Entry, name: str | None) -> LanguageInfo:
    return LanguageInfo(key, e.tag.language, e.tag.script, name or _lang.name(e.tag.code),
                        resource_level(e.tag.code), e.population, e.tag.region,
                        e.source_code if e.source_code != key else None)


# --------------------------------------------------------------------------------------------

_SENT_END = re.compile(r"(?<=[.!?;։۔।॥။።፧።。！？])\s+|(?<=[。！？])")


def split_sentences(text: str, min_chars: int = 1) -> list[str]:
    """Split ``text`` at newlines and after sentence-final punctuation of common scripts.

    Scripts without spaces (CJK) are split after their full stops. Segments shorter than
    ``min_chars`` are dropped.
    """
    out = []
    for line in text.splitlines():
        for s in _SENT_END.split(line):
            s = s.strip()
            if len(s) >= min_chars:
                out.append(s)
    return out


_UDHR_FIELDS = ("specimen_48", "specimen_36", "specimen_32", "specimen_21", "specimen_16", "tester")


def load_udhr(languages: Sequence[str] | None = None, min_chars: int = 8) -> Corpus:
    """UDHR sample text from ``gflanguages`` (the embedded default corpus).

    Each language's ``sample_text`` specimens are split into sentences; specimens that merely
    repeat a longer one (the short poster/masthead fields are excerpts) are dropped.

    Parameters
    ----------
    languages : sequence of str, optional
        Languages to keep, in any accepted form: FLORES style (``heb_Hebr``), gflanguages ids
        (``he_Hebr``), ISO 639-3 (``heb``) or ISO 639-1 (``he``). Default: every language with
        sample text.
    min_chars : int
        Shorter segments are dropped.

    Returns
    -------
    Corpus
        Keyed FLORES style (``heb_Hebr``); not parallel. ``extra["skipped"]`` lists the
        gflanguages ids that name no language :mod:`empirical.languages` knows (``mis_Latn``)
        and ``extra["merged"]`` those whose code a more populous entry took (``arb_Arab``,
        beside ``ar_Arab``).
    """
    import gflanguages

    entries, segments, names, skipped = [], {}, {}, []
    for lid, lang in gflanguages.LoadLanguages().items():
        if not lang.HasField("sample_text") or "_" not in lid:
            continue
        try:
            tag = _lang.parse(lid)
        except ValueError:
            skipped.append(lid)
            continue
        st = lang.sample_text
        segs: list[str] = []
        for f in _UDHR_FIELDS:
            for s in split_sentences(getattr(st, f), min_chars):
                if s not in segs:
                    segs.append(s)
        # The specimens overlap: keep a segment only if no other contains it.
        segs = [s for s in segs if not any(s != t and s in t for t in segs)]
        if segs:
            entries.append(_Entry(lid, tag, int(lang.population)))
            segments[lid], names[lid] = segs, lang.name
    keyed = _assign_keys(entries, "gflanguages", strict=False)
    texts = {k: segments[e.source_code] for k, e in keyed.items()}
    info = {k: _info(k, e, names[e.source_code]) for k, e in keyed.items()}
    kept = {e.source_code for e in keyed.values()}
    corpus = Corpus("udhr", texts, info, parallel=False, source=f"gflanguages {_version('gflanguages')}",
                    extra={"skipped": skipped, "merged": sorted(e.source_code for e in entries
                                                                if e.source_code not in kept)})
    return corpus if languages is None else corpus.select(languages)


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


def _read_text(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc})") from exc
    lines = [unicodedata.normalize("NFC", l) for l in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    lines = [l.rstrip("\r") for l in lines]
    if not any(l.strip() for l in lines):
        raise ValueError(f"{path}: empty text")
    return lines


def _peek(path: Path, n_bytes: int = 16384) -> list[str]:
    """The first lines of a text file (enough to tell its script), undecodable bytes dropped."""
    with open(path, "rb") as fh:
        return fh.read(n_bytes).decode("utf-8", errors="ignore").splitlines()


_PARALLEL_PATTERNS = (
    re.compile(r"newstest2019-ref\.(?P<code>[^.]+)\.txt$"),
    re.compile(r"newstest2019-src\.(?P<code>[^.]+)\.txt$"),
    re.compile(r"(?P<code>[a-z]{3}_[A-Z][a-z]{3})\.(dev|devtest)$"),  # FLORES-200
    re.compile(r"(?P<code>[a-z]{2,3}(?:[-_][A-Za-z]{2,4})?)\.txt$"),
)


def load_parallel_dir(path: str | Path, languages: Sequence[str] | None = None,
                      name: str | None = None) -> Corpus:
    """A folder with one line-aligned file per language (NTREX-128, FLORES-200 layout).

    Parameters
    ----------
    path : str or Path
        The folder; read in place. ``LANGUAGES.tsv`` (code, name), when present, gives names.
    languages : sequence of str, optional
        Languages to load, in any accepted form (``he``, ``heb``, ``heb_Hebr``) or as the file
        names them (``aze-Latn``, ``eng-GB``). Default: every file.
    name : str, optional
        Corpus name (default: the folder name).

    Returns
    -------
    Corpus
        Keyed FLORES style (module docstring, "Language codes"): NTREX's ``heb`` is
        ``heb_Hebr``, ``zho-TW`` is ``zho_Hant``, ``eng-GB`` is ``eng_Latn_GB``. Parallel: line
        ``i`` is the same sentence in every language.

    Raises
    ------
    ValueError
        A language the folder does not have (the message suggests the closest ones it has), a
        file name that names no known language, two files for one language, an empty or
        undecodable file, files with different line counts (the message names the file).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    names: dict[str, str] = {}
    tsv = root / "LANGUAGES.tsv"
    if tsv.exists():
        for line in tsv.read_text(encoding="utf-8").splitlines():
            bits = line.strip().split(None, 1)
            if len(bits) >= 2:
                names[bits[0].strip()] = bits[1].strip()
    files: dict[str, Path] = {}
    for f in sorted(root.iterdir()):
        for pat in _PARALLEL_PATTERNS:
            m = pat.match(f.name)
            if m:
                files.setdefault(m.group("code"), f)
                break
    if not files:
        raise ValueError(f"{root}: no per-language text files found")
    entries = []
    for code, f in files.items():
        try:
            entries.append(_Entry(code, _tag_of_text(code, _peek(f))))
        except ValueError as exc:
            raise ValueError(f"{f}: the file name names no known language ({exc})") from None
    keyed = _assign_keys(entries, str(root), strict=True)
    info_all = {k: _info(k, e, names.get(e.source_code)) for k, e in keyed.items()}
    corpus_name = name or root.name
    keys = list(keyed) if languages is None else list(dict.fromkeys(
        _resolve(c, keyed, info_all, corpus_name) for c in languages))
    texts = {k: _read_text(files[keyed[k].source_code]) for k in keys}
    counts = {k: len(v) for k, v in texts.items()}
    ref = max(set(counts.values()), key=list(counts.values()).count)
    for k, n in counts.items():
        if n != ref:
            raise ValueError(f"{files[keyed[k].source_code]}: {n} lines, but the other files have {ref}; "
                             "parallel files must be line-aligned")
    return Corpus(corpus_name, texts, {k: info_all[k] for k in keys}, parallel=True, source=str(root))


def load_text_files(mapping: Mapping[str, str | Path], name: str = "files",
                    parallel: bool = False) -> Corpus:
    """A corpus from ``{code: path}``; each non-empty line is one segment.

    The codes are any accepted form; the corpus is keyed FLORES style (``{"he": ...}`` gives
    ``heb_Hebr``), the script checked against the text when the code names none.

    Raises
    ------
    ValueError
        Unknown code, two codes for one language, empty or undecodable file; line count
        mismatch when ``parallel``.
    """
    lines = {code: _read_text(Path(p)) for code, p in mapping.items()}
    entries = [_Entry(code, _tag_of_text(code, v[:200])) for code, v in lines.items()]
    keyed = _assign_keys(entries, "load_text_files", strict=True)
    texts = {k: lines[e.source_code] if parallel else [l for l in lines[e.source_code] if l.strip()]
             for k, e in keyed.items()}
    info = {k: _info(k, e, None) for k, e in keyed.items()}
    if parallel and len({len(v) for v in texts.values()}) > 1:
        raise ValueError("parallel files differ in line count: "
                         + ", ".join(f"{mapping[e.source_code]}={len(texts[k])}" for k, e in keyed.items()))
    return Corpus(name, texts, info, parallel=parallel, source="files")


def load_flores(languages: Sequence[str], split: str = "devtest",
                dataset: str = "openlanguagedata/flores_plus") -> Corpus:
    """FLORES-200 / FLORES+ through ``datasets`` (needs the network and hub access).

    Parameters
    ----------
    languages : sequence of str
        Languages in any accepted form (``he``, ``heb``, ``heb_Hebr``). A FLORES-style code is
        asked of the hub as written (so a config the dataset spells its own way, ``cmn_Hans``,
        can be named); any other form is normalised first (``he`` -> ``heb_Hebr``).
    split : str
        ``dev`` or ``devtest``.
    dataset : str
        Hub dataset id.

    Returns
    -------
    Corpus
        Keyed by the normalised codes (``cmn_Hans`` -> ``zho_Hans``); parallel.
    """
    configs = {}
    for code in languages:
        tag = _lang.parse(code)
        configs[tag.code] = code.strip() if re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", code.strip()) else tag.code
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("load_flores needs the 'datasets' package (the project's 'hub' extra)") from exc
    texts, info = {}, {}
    for key, config in configs.items():
        ds = datasets.load_dataset(dataset, config, split=split)
        col = "text" if "text" in ds.column_names else "sentence"
        texts[key] = list(ds[col])
        info[key] = _info(key, _Entry(config, _lang.parse(key)), None)
    return Corpus(f"flores-{split}", texts, info, parallel=True, source=dataset)
