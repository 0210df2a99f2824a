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

Resource levels
---------------
:data:`RESOURCE_LEVEL` tags common languages ``high`` / ``medium`` / ``low`` following the
taxonomy of Joshi et al. (2020), "The State and Fate of Linguistic Diversity and Inclusion in the
NLP World" (ACL): classes 5-4 -> high, 3 -> medium, 2-0 -> low. Languages not in the table are
tagged ``"unknown"``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = ["Corpus", "LanguageInfo", "RESOURCE_LEVEL", "ISO639_1_TO_3", "load_udhr",
           "load_parallel_dir", "load_flores", "load_text_files", "split_sentences"]

# ISO 639-1 -> ISO 639-3 (macrolanguage codes where ISO maps a 2-letter code to one).
ISO639_1_TO_3 = dict(pair.split(":") for pair in """
aa:aar ab:abk ae:ave af:afr ak:aka am:amh an:arg ar:ara as:asm av:ava ay:aym az:aze ba:bak
be:bel bg:bul bi:bis bm:bam bn:ben bo:bod br:bre bs:bos ca:cat ce:che ch:cha co:cos cr:cre
cs:ces cu:chu cv:chv cy:cym da:dan de:deu dv:div dz:dzo ee:ewe el:ell en:eng eo:epo es:spa
et:est eu:eus fa:fas ff:ful fi:fin fj:fij fo:fao fr:fra fy:fry ga:gle gd:gla gl:glg gn:grn
gu:guj gv:glv ha:hau he:heb hi:hin ho:hmo hr:hrv ht:hat hu:hun hy:hye hz:her ia:ina id:ind
ie:ile ig:ibo ii:iii ik:ipk io:ido is:isl it:ita iu:iku ja:jpn jv:jav ka:kat kg:kon ki:kik
kj:kua kk:kaz kl:kal km:khm kn:kan ko:kor kr:kau ks:kas ku:kur kv:kom kw:cor ky:kir la:lat
lb:ltz lg:lug li:lim ln:lin lo:lao lt:lit lu:lub lv:lav mg:mlg mh:mah mi:mri mk:mkd ml:mal
mn:mon mr:mar ms:msa mt:mlt my:mya na:nau nb:nob nd:nde ne:nep ng:ndo nl:nld nn:nno no:nor
nr:nbl nv:nav ny:nya oc:oci oj:oji om:orm or:ori os:oss pa:pan pi:pli pl:pol ps:pus pt:por
qu:que rm:roh rn:run ro:ron ru:rus rw:kin sa:san sc:srd sd:snd se:sme sg:sag si:sin sk:slk
sl:slv sm:smo sn:sna so:som sq:sqi sr:srp ss:ssw st:sot su:sun sv:swe sw:swa ta:tam te:tel
tg:tgk th:tha ti:tir tk:tuk tl:tgl tn:tsn to:ton tr:tur ts:tso tt:tat tw:twi ty:tah ug:uig
uk:ukr ur:urd uz:uzb ve:ven vi:vie vo:vol wa:wln wo:wol xh:xho yi:yid yo:yor za:zha zh:zho
zu:zul""".split())

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


def resource_level(iso639_3: str) -> str:
    """``high`` / ``medium`` / ``low`` per Joshi et al. (2020), else ``unknown``."""
    return RESOURCE_LEVEL.get(iso639_3, "unknown")


@dataclass(frozen=True)
class LanguageInfo:
    """Metadata of one language of a corpus.

    Attributes
    ----------
    code : str
        The corpus' own code (key in :attr:`Corpus.texts`).
    iso639_3 : str
    script : str or None
        ISO 15924 script code (``Latn``, ``Hebr``...), when known.
    name : str or None
    resource_level : str
        ``high``, ``medium``, ``low`` or ``unknown``.
    """

    code: str
    iso639_3: str
    script: str | None = None
    name: str | None = None
    resource_level: str = "unknown"
    population: int = 0


@dataclass
class Corpus:
    """Per-language text segments with metadata.

    Attributes
    ----------
    name : str
    texts : dict of str to list of str
        Segments (sentences or lines) per language code.
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

    def __getitem__(self, code: str) -> list[str]:
        return self.texts[_resolve(code, self.texts, self.info)]

    def __len__(self) -> int:
        return len(self.texts)

    def n_bytes(self, code: str) -> int:
        """UTF-8 bytes of all segments of ``code``."""
        return sum(len(s.encode("utf-8")) for s in self[code])

    def select(self, languages: Iterable[str]) -> "Corpus":
        """A corpus restricted to ``languages`` (codes, ISO 639-3 codes or ISO 639-1 codes)."""
        keys = [_resolve(c, self.texts, self.info) for c in languages]
        return Corpus(self.name, {k: self.texts[k] for k in keys}, {k: self.info[k] for k in keys},
                      self.parallel, self.source, dict(self.extra))

    def head(self, n: int) -> "Corpus":
        """The first ``n`` segments of every language (keeps alignment)."""
        return Corpus(self.name, {k: v[:n] for k, v in self.texts.items()}, dict(self.info),
                      self.parallel, self.source, dict(self.extra))


def _resolve(code: str, available: Mapping[str, object], info: Mapping[str, LanguageInfo] | None = None) -> str:
    if code in available:
        return code
    matches = []
    if info:
        matches = [k for k, i in info.items() if code in (i.iso639_3, f"{i.iso639_3}_{i.script}")]
        if not matches and len(code) == 2 and code in ISO639_1_TO_3:
            matches = [k for k, i in info.items() if i.iso639_3 == ISO639_1_TO_3[code]]
    if len(matches) >= 1:
        # Several scripts of one language (eng_Latn, eng_Shaw): take the most used one.
        return sorted(matches, key=lambda k: (-(info[k].population if info else 0), len(k), k))[0]
    raise ValueError(f"unknown language code {code!r}; available codes: {', '.join(sorted(available))}")


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
        Codes to keep: gflanguages ids (``he_Hebr``), ``<iso639-3>_<Script>`` (``heb_Hebr``),
        ISO 639-3 (``heb``) or ISO 639-1 (``he``). Default: every language with sample text.
    min_chars : int
        Shorter segments are dropped.

    Returns
    -------
    Corpus
        Keyed by ``<iso639-3>_<Script>`` (e.g. ``heb_Hebr``); not parallel.
    """
    import gflanguages

    langs = gflanguages.LoadLanguages()
    texts: dict[str, list[str]] = {}
    info: dict[str, LanguageInfo] = {}
    for lid, lang in langs.items():
        if not lang.HasField("sample_text") or "_" not in lid:
            continue
        iso = ISO639_1_TO_3.get(lang.language, lang.language)
        if not re.fullmatch(r"[a-z]{3}", iso):
            continue
        key = f"{iso}_{lang.script}"
        st = lang.sample_text
        segs: list[str] = []
        for f in _UDHR_FIELDS:
            for s in split_sentences(getattr(st, f), min_chars):
                if s not in segs:
                    segs.append(s)
        # The specimens overlap: keep a segment only if no other contains it.
        segs = [s for s in segs if not any(s != t and s in t for t in segs)]
        if segs and key not in texts:
            texts[key] = segs
            info[key] = LanguageInfo(key, iso, lang.script, lang.name, resource_level(iso),
                                     int(lang.population))
    corpus = Corpus("udhr", texts, info, parallel=False, source=f"gflanguages {_version('gflanguages')}")
    if languages is not None:
        aliases = {lid: f"{ISO639_1_TO_3.get(l.language, l.language)}_{l.script}" for lid, l in langs.items()}
        corpus = corpus.select([aliases.get(c, c) for c in languages])
    return corpus


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


_PARALLEL_PATTERNS = (
    re.compile(r"newstest2019-ref\.(?P<code>[^.]+)\.txt$"),
    re.compile(r"newstest2019-src\.(?P<code>[^.]+)\.txt$"),
    re.compile(r"(?P<code>[a-z]{3}_[A-Z][a-z]{3})\.(dev|devtest)$"),  # FLORES-200
    re.compile(r"(?P<code>[a-z]{2,3}(?:[-_][A-Za-z]{2,4})?)\.txt$"),
)


def _code_info(code: str, names: Mapping[str, str]) -> LanguageInfo:
    parts = re.split(r"[-_]", code)
    iso = ISO639_1_TO_3.get(parts[0], parts[0])
    script = next((p for p in parts[1:] if re.fullmatch(r"[A-Z][a-z]{3}", p)), None)
    return LanguageInfo(code, iso, script, names.get(code), resource_level(iso))


def load_parallel_dir(path: str | Path, languages: Sequence[str] | None = None,
                      name: str | None = None) -> Corpus:
    """A folder with one line-aligned file per language (NTREX-128, FLORES-200 layout).

    Parameters
    ----------
    path : str or Path
        The folder; read in place. ``LANGUAGES.tsv`` (code, name), when present, gives names.
    languages : sequence of str, optional
        Codes to load (file codes such as ``heb`` or ``aze-Latn``, or ISO 639-3/639-1 codes).
    name : str, optional
        Corpus name (default: the folder name).

    Returns
    -------
    Corpus
        Parallel: line ``i`` is the same sentence in every language.

    Raises
    ------
    ValueError
        Unknown code (the message lists the available ones), empty or undecodable file, files
        with different line counts (the message names the file).
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
    info_all = {c: _code_info(c, names) for c in files}
    codes = list(files) if languages is None else [_resolve(c, files, info_all) for c in languages]
    texts = {c: _read_text(files[c]) for c in codes}
    counts = {c: len(v) for c, v in texts.items()}
    ref = max(set(counts.values()), key=list(counts.values()).count)
    for c, n in counts.items():
        if n != ref:
            raise ValueError(f"{files[c]}: {n} lines, but the other files have {ref}; "
                             "parallel files must be line-aligned")
    return Corpus(name or root.name, texts, {c: info_all[c] for c in codes}, parallel=True,
                  source=str(root))


def load_text_files(mapping: Mapping[str, str | Path], name: str = "files",
                    parallel: bool = False) -> Corpus:
    """A corpus from ``{code: path}``; each non-empty line is one segment.

    Raises
    ------
    ValueError
        Empty or undecodable file; line count mismatch when ``parallel``.
    """
    texts, info = {}, {}
    for code, p in mapping.items():
        lines = _read_text(Path(p))
        texts[code] = lines if parallel else [l for l in lines if l.strip()]
        info[code] = _code_info(code, {})
    if parallel and len({len(v) for v in texts.values()}) > 1:
        raise ValueError("parallel files differ in line count: "
                         + ", ".join(f"{mapping[c]}={len(v)}" for c, v in texts.items()))
    return Corpus(name, texts, info, parallel=parallel, source="files")


def load_flores(languages: Sequence[str], split: str = "devtest",
                dataset: str = "openlanguagedata/flores_plus") -> Corpus:
    """FLORES-200 / FLORES+ through ``datasets`` (needs the network and hub access).

    Parameters
    ----------
    languages : sequence of str
        FLORES codes such as ``heb_Hebr``.
    split : str
        ``dev`` or ``devtest``.
    dataset : str
        Hub dataset id.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("load_flores needs the 'datasets' package (the project's 'hub' extra)") from exc
    texts, info = {}, {}
    for code in languages:
        ds = datasets.load_dataset(dataset, code, split=split)
        col = "text" if "text" in ds.column_names else "sentence"
        texts[code] = list(ds[col])
        info[code] = _code_info(code, {})
    return Corpus(f"flores-{split}", texts, info, parallel=True, source=dataset)
