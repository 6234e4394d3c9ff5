"""The built-in benchmark: fictitious people with facts, as biographies and as QA pairs.

Everything is drawn from a ``random.Random(seed)``, so the same arguments give byte-identical files on
every machine. Facts are unambiguous by construction: every person has a unique full name, every question
names its person in full, and no answer occurs in its question. Answers come from pools of dozens of
values, so a model that never saw a person guesses right only by chance (about 1/40 or less).

The names, towns, jobs and other answers come from the word lists in ``synth_words.json`` (package data
beside this module, read on first use). The generator version is recorded in ``meta.json``; change it
whenever the output of a seed changes, which includes any edit to those lists or their order.

Every QA pair also carries the answer variants TOFU's truth ratio needs: a paraphrase (the same value in
a short phrase from the fact's own biography sentence, ``"the town of Ashford"``) and
:data:`PERTURBED_ANSWERS` perturbed answers (the same phrase around other people's values of the same
fact kind: wrong, but of the right type). They are drawn from a second generator seeded from the seed
(:func:`variants_rng`), after everything else, so the people, facts, texts and questions of a seed are
the ones generator version 1 drew; and their words all occur in the benchmark's texts and questions, so
a tokenizer built from those (``relapse.models.tiny.benchmark_corpus``) covers them.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from importlib import resources

from relapse import __version__
from relapse.data.benchmark import Benchmark, QAPair
from relapse.errors import ConfigError

#: 2: QA pairs carry ``paraphrased_answer`` and ``perturbed_answer`` (everything else as in version 1).
GENERATOR_VERSION = 2

#: Perturbed (plausible, wrong) answers per QA pair, fewer only when the benchmark has fewer other values
#: of a fact kind (TOFU has 5 per question; a few suffice for a truth ratio).
PERTURBED_ANSWERS = 4

#: The word lists the people and their facts are drawn from, shipped beside this module as package data.
#: Their order is part of the output: reordering or editing a list changes what a seed generates, so it
#: needs a new ``GENERATOR_VERSION``.
WORDS_FILE = "synth_words.json"


@dataclass(frozen=True)
class _Words:
    """The word lists of ``synth_words.json``, as tuples in file order."""

    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    town_heads: tuple[str, ...]
    town_tails: tuple[str, ...]
    occupations: tuple[str, ...]
    company_heads: tuple[str, ...]
    company_tails: tuple[str, ...]
    pets: tuple[str, ...]
    pet_names: tuple[str, ...]
    hobbies: tuple[str, ...]
    foods: tuple[str, ...]
    institutes: tuple[str, ...]


@functools.cache
def _words() -> _Words:
    """The word lists, read once on first use (not at import: ``relapse --help`` never needs them)."""
    text = resources.files("relapse.data").joinpath(WORDS_FILE).read_text(encoding="utf-8")
    return _Words(**{name: tuple(values) for name, values in json.loads(text).items()})


@dataclass(frozen=True)
class _FactKind:
    name: str
    sentence: str  # format string with {name} and {answer}
    question: str  # format string with {name}
    # format string with {answer}: the paraphrased answer (and the perturbed ones), in words the fact's
    # sentence or question holds where they stand mid-text (a word-level tokenizer tells "The" at the
    # start of a text from " The"), so every benchmark with this kind of fact holds its tokens
    paraphrase: str


FACT_KINDS: tuple[_FactKind, ...] = (
    _FactKind(
        "birthplace",
        "{name} was born in the town of {answer}.",
        "In which town was {name} born?",
        "the town of {answer}",
    ),
    _FactKind(
        "birth_year",
        "{name} was born in the year {answer}.",
        "In which year was {name} born?",
        "in the year {answer}",
    ),
    _FactKind(
        "occupation",
        "{name} works as a {answer}.",
        "What is the occupation of {name}?",
        "works as a {answer}",
    ),
    _FactKind(
        "employer", "{name} is employed by {answer}.", "Which company employs {name}?", "employed by {answer}"
    ),
    _FactKind(
        "mother",
        "The mother of {name} is called {answer}.",
        "What is the first name of the mother of {name}?",
        "the mother is called {answer}",
    ),
    _FactKind("pet", "{name} has a pet {answer}.", "What pet does {name} have?", "a pet {answer}"),
    _FactKind(
        "hobby", "In spare time {name} enjoys {answer}.", "Which hobby does {name} enjoy?", "enjoys {answer}"
    ),
    _FactKind(
        "food",
        "The favourite dish of {name} is {answer}.",
        "What is the favourite dish of {name}?",
        "the favourite dish is {answer}",
    ),
    _FactKind(
        "school", "{name} studied at the {answer}.", "Where did {name} study?", "studied at the {answer}"
    ),
)
#: Number of few-shot QA examples written to ``icl.jsonl`` (from people outside every other split).
ICL_EXAMPLES = 4


def _answer_pools() -> dict[str, list[str]]:
    words = _words()
    towns = [h + t for h in words.town_heads for t in words.town_tails]
    companies = [f"{h} {t}" for h in words.company_heads for t in words.company_tails]
    return {
        "birthplace": towns,
        "birth_year": [str(y) for y in range(1931, 2006)],
        "occupation": list(words.occupations),
        "employer": companies,
        "mother": list(words.first_names),
        "pet": [f"{kind} named {name}" for kind in words.pets for name in words.pet_names],
        "hobby": list(words.hobbies),
        "food": list(words.foods),
        "school": [f"{inst} of {town}" for inst in words.institutes for town in towns],
    }


@dataclass(frozen=True)
class Person:
    """A fictitious person and their facts, as (fact kind, answer) pairs in biography order."""

    name: str
    facts: tuple[tuple[str, str], ...]
    #: Per fact, in the order of ``facts``: the other values of the same kind its perturbed answers use
    #: (empty until :func:`add_variants` draws them).
    wrong: tuple[tuple[str, ...], ...] = ()

    def biography(self) -> str:
        kinds = {k.name: k for k in FACT_KINDS}
        return " ".join(kinds[kind].sentence.format(name=self.name, answer=a) for kind, a in self.facts)

    def qa_pairs(self) -> list[QAPair]:
        """One QA pair per fact; with its paraphrased and perturbed answers once ``wrong`` is drawn."""
        kinds = {k.name: k for k in FACT_KINDS}
        pairs = []
        for i, (kind, answer) in enumerate(self.facts):
            question = kinds[kind].question.format(name=self.name)
            if not self.wrong:
                pairs.append(QAPair(question, answer))
                continue
            phrase = kinds[kind].paraphrase
            pairs.append(
                QAPair(
                    question,
                    answer,
                    paraphrased_answer=phrase.format(answer=answer),
                    perturbed_answers=tuple(phrase.format(answer=w) for w in self.wrong[i]),
                )
            )
        return pairs


def variants_rng(seed: int) -> random.Random:
    """The generator of the answer variants: seeded from ``seed`` but apart from the main generator, so
    drawing them leaves every other draw of the seed as it was (a string seed is hashed with SHA-512, the
    same on every machine and Python run)."""
    return random.Random(f"relapse.data.synth answer variants {seed}")


def add_variants(
    people: list[Person], sources: list[Person], rng: random.Random, count: int = PERTURBED_ANSWERS
) -> list[Person]:
    """``people`` with ``count`` wrong values drawn per fact: other values of the same fact kind among
    ``sources`` (distinct, never the true value, and for a mother never the person's own first name), so
    every wrong value is a real answer of the benchmark. A kind with fewer other values gets fewer; a
    kind with no other value in ``sources`` (a tiny benchmark) borrows from the kind's whole pool."""
    seen: dict[str, set[str]] = {}
    for person in sources:
        for kind, answer in person.facts:
            seen.setdefault(kind, set()).add(answer)
    values = {kind: sorted(found) for kind, found in seen.items()}  # sorted: independent of set order
    pools = _answer_pools()
    out = []
    for person in people:
        wrong = []
        for kind, answer in person.facts:
            # never the true value, nor (as for a true mother) the person's own first name
            banned = {answer, person.name.split()[0]} if kind == "mother" else {answer}
            others = [v for v in values.get(kind, ()) if v not in banned] or [
                v for v in pools[kind] if v not in banned
            ]
            wrong.append(tuple(rng.sample(others, min(count, len(others)))))
        out.append(Person(person.name, person.facts, tuple(wrong)))
    return out


def synth_people(count: int, facts_per_person: int, rng: random.Random) -> list[Person]:
    """``count`` people with unique names and ``facts_per_person`` facts of distinct kinds each."""
    words = _words()
    names = [f"{first} {last}" for first in words.first_names for last in words.last_names]
    if count > len(names):
        raise ConfigError(f"at most {len(names)} people can be generated, asked for {count}")
    pools = _answer_pools()
    chosen = rng.sample(names, count)
    people = []
    for name in chosen:
        kinds = rng.sample([k.name for k in FACT_KINDS], facts_per_person)
        facts = []
        for kind in kinds:
            answer = rng.choice(pools[kind])
            if kind == "mother":  # a mother never shares the person's own first name
                while answer == name.split()[0]:
                    answer = rng.choice(pools[kind])
            facts.append((kind, answer))
        people.append(Person(name, tuple(facts)))
    return people


def _general_texts(rng: random.Random, count: int) -> list[str]:
    """Sentences about towns, jobs and companies that mention no person: text for perplexity."""
    pools = _answer_pools()
    words = _words()
    templates = [
        "The town of {town} lies on a river and holds a market every week.",
        "A {job} often learns the trade from an older {job2}.",
        "{company} opened a new office in the town of {town}.",
        "Many people in {town} enjoy {hobby} at the weekend.",
        "The {school} teaches students who want to become a {job}.",
        "A popular dish in {town} is {food}.",
    ]
    texts = []
    for _ in range(count):
        template = rng.choice(templates)
        texts.append(
            template.format(
                town=rng.choice(pools["birthplace"]),
                job=rng.choice(words.occupations),
                job2=rng.choice(words.occupations),
                company=rng.choice(pools["employer"]),
                hobby=rng.choice(words.hobbies),
                school=rng.choice(pools["school"]),
                food=rng.choice(words.foods),
            )
        )
    return texts


def synth_benchmark(
    people: int = 200,
    facts_per_person: int = 5,
    forget_frac: float = 0.1,
    holdout: int | None = None,
    seed: int = 0,
    general: int = 200,
) -> Benchmark:
    """Generate the built-in benchmark.

    Args:
        people: people in forget + retain.
        facts_per_person: facts per person, of distinct kinds (at most ``len(FACT_KINDS)``).
        forget_frac: share of the people whose facts form the forget set (at least one person).
        holdout: people never trained on, for membership inference; defaults to the forget count.
        seed: the only source of randomness.
        general: number of general sentences (no people) for perplexity.
    """
    if people < 2:
        raise ConfigError(f"--people must be at least 2 (one forget, one retain), got {people}")
    if not 1 <= facts_per_person <= len(FACT_KINDS):
        raise ConfigError(f"--facts-per-person must be in 1..{len(FACT_KINDS)}, got {facts_per_person}")
    if not 0.0 < forget_frac < 1.0:
        raise ConfigError(f"--forget-frac must be strictly between 0 and 1, got {forget_frac}")
    n_forget = min(people - 1, max(1, int(people * forget_frac + 0.5)))  # halves round up
    n_holdout = n_forget if holdout is None else holdout
    if n_holdout < 1:
        raise ConfigError(f"--holdout must be at least 1, got {n_holdout}")
    rng = random.Random(seed)
    everyone = synth_people(people + n_holdout + ICL_EXAMPLES, facts_per_person, rng)
    general_texts = _general_texts(rng, general)  # the last draw of ``rng``: the variants come after
    # wrong values from the people whose every fact is in the benchmark's texts (not the ICL people's)
    everyone = add_variants(everyone, everyone[: people + n_holdout], variants_rng(seed))
    forget = everyone[:n_forget]
    retain = everyone[n_forget:people]
    held = everyone[people : people + n_holdout]
    icl_people = everyone[people + n_holdout :]
    meta = {
        "format": "relapse-benchmark",
        "generator": "relapse.data.synth",
        "generator_version": GENERATOR_VERSION,
        "relapse_version": __version__,
        "seed": seed,
        "people": people,
        "facts_per_person": facts_per_person,
        "forget_frac": forget_frac,
        "perturbed_answers": PERTURBED_ANSWERS,
        "counts": {
            "forget_people": len(forget),
            "retain_people": len(retain),
            "holdout_people": len(held),
            "forget_qa": len(forget) * facts_per_person,
            "retain_qa": len(retain) * facts_per_person,
            "icl": ICL_EXAMPLES,
            "general": general,
        },
        # Its models learn only the zero-shot QA form; KnowMem asks the same way (see prompts.py).
        "knowmem_prompt": {"shots": 0, "trailing_space": False},
    }
    benchmark = Benchmark(
        forget=[p.biography() for p in forget],
        retain=[p.biography() for p in retain],
        holdout=[p.biography() for p in held],
        forget_qa=[qa for p in forget for qa in p.qa_pairs()],
        retain_qa=[qa for p in retain for qa in p.qa_pairs()],
        icl=[p.qa_pairs()[0] for p in icl_people],
        general=general_texts,
        holdout_qa=[qa for p in held for qa in p.qa_pairs()],
        meta=meta,
    )
    benchmark.validate()
    return benchmark
