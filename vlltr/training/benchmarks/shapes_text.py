"""Noisy web-page-like descriptions for Shapes-LT classes.

Each class gets 6-10 descriptive sentences in varied wording (synonyms and paraphrases of its shape,
colour and pattern) mixed with distractors making up 30-40% of the sentences: `trivia` (nothing visual)
and `other_class` (hard: the full visual description of another class, "It is often confused with the
velmor star, a blue star covered in dots."), so picking good anchor sentences needs the images, not the words
alone. Class names follow `class_names`. Sentences are spread over a summary and sections, with a "See also"
and a "References" section that the loader drops.
Every sentence ends with a period and contains no abbreviation, so the loader's splitter recovers it exactly.
"""

from __future__ import annotations

import numpy as np

from vlltr.training.benchmarks.layout import DESCRIPTIVE, DISTRACTOR, Sentence, WikiDoc

SHAPE_FACTS: dict[str, list[str]] = {
    "circle": [
        "Its outline is perfectly round.",
        "It is a round figure with no corners at all.",
        "The figure is a disc with one smooth curved edge.",
        "Its edge curves evenly all the way around.",
        "It has no straight edges and no corners.",
        "It is circular, like a coin seen from above.",
    ],
    "square": [
        "It has four equal straight sides.",
        "Each of its four corners is a right angle.",
        "The figure is a square, as boxy as a window pane.",
        "Its outline is made of four straight edges of the same length.",
        "It looks like a tile with four sharp corners.",
        "It is a quadrilateral whose opposite sides are parallel.",
    ],
    "triangle": [
        "It is three-cornered, with three straight edges.",
        "The figure is a triangle.",
        "Its outline has exactly three sides and three points.",
        "It has the outline of a warning sign with three corners.",
        "Three straight edges meet at three sharp corners.",
        "It is triangular, like a wedge of cheese seen from the side.",
    ],
    "cross": [
        "It is shaped like a plus sign.",
        "Two straight bars cross at right angles in its middle.",
        "The figure is a cross with four arms of equal length.",
        "Its four short arms reach out from the centre.",
        "It has twelve corners where its arms meet and end.",
        "It looks like the symbol used for addition.",
    ],
    "star": [
        "It is a star with five pointed tips.",
        "Five sharp points radiate from its centre.",
        "The figure is star-shaped.",
        "Its outline zigzags between five outer points and five inner corners.",
        "It resembles the stars printed on a flag.",
        "It has five spikes of equal length.",
    ],
    "ring": [
        "It is a ring, hollow in the middle.",
        "The figure looks like a doughnut with a round hole in its centre.",
        "The middle of the figure is empty and shows the background.",
        "It is a thick round band.",
        "It resembles a washer or a life buoy seen from above.",
        "Its inner edge and outer edge are both perfectly round.",
    ],
}
COLOUR_FACTS: dict[str, list[str]] = {
    "red": [
        "It is red.",
        "Its colour is that of a ripe tomato.",
        "The figure is painted a bright scarlet.",
        "It is the same colour as a fire truck.",
        "Its hue is a strong, warm red.",
    ],
    "green": [
        "It is green.",
        "Its colour is that of fresh grass.",
        "The figure is painted a bright emerald.",
        "It has the colour of a lime.",
        "Its hue is a vivid leafy green.",
    ],
    "blue": [
        "It is blue.",
        "Its colour is that of a clear summer sky at noon.",
        "The figure is painted a deep royal blue.",
        "It has the colour of a sapphire.",
        "Its hue is a strong cool blue.",
    ],
    "yellow": [
        "It is yellow.",
        "Its colour is that of a lemon.",
        "The figure is painted a bright golden yellow.",
        "It has the colour of a sunflower.",
        "Its hue is a warm sunny yellow.",
    ],
    "magenta": [
        "It is magenta.",
        "Its colour is a vivid pinkish purple.",
        "The figure is painted a bright fuchsia.",
        "It has the colour of a hot pink highlighter.",
        "Its hue is a strong purplish pink.",
    ],
    "cyan": [
        "It is cyan.",
        "Its colour is a bright blue-green.",
        "The figure is painted turquoise.",
        "It has the colour of shallow tropical water.",
        "Its hue is a clear aqua tone.",
    ],
}
PATTERN_FACTS: dict[str, list[str]] = {
    "solid": [
        "It is filled with a single flat colour.",
        "Its surface is solid, without any markings.",
        "The fill is uniform from edge to edge.",
        "Its colour covers the whole figure evenly.",
    ],
    "striped": [
        "It is covered in stripes.",
        "Parallel pale bands run across its surface.",
        "The figure is striped.",
        "Its fill alternates between colour and white in straight lines.",
        "Thin white stripes cross it from side to side.",
    ],
    "dotted": [
        "It is covered in small dots.",
        "Its surface is speckled with white spots.",
        "The figure has a polka dot pattern.",
        "Little pale spots are set in neat rows over it.",
        "The fill is dotted all over.",
    ],
}
PATTERN_PHRASE = {"solid": "filled in solid", "striped": "covered in stripes", "dotted": "covered in dots"}
COMBINED = [
    "It is a {pattern} {colour} {shape}.",
    "Pictures of it show a {colour} {shape} {pattern_phrase}.",
    "At a glance, one sees a {shape} in {colour}.",
    "In every picture, the {shape} is {colour} and {pattern}.",
    "It always appears as a single {colour} {shape}, placed anywhere and turned at any angle.",
    "The {shape} varies in size and position, but it is always {colour}.",
    "Its {colour} {shape} sits on a grey, grainy background.",
]
TRIVIA = [
    "The design was popular in the {decade}s.",
    "It was first printed in a catalogue of teaching materials in {year}.",
    "A small museum in {town} keeps several early examples.",
    "Collectors value the early editions more than the recent ones.",
    "The figure is named in at least {count} different languages.",
    "It was used as a logo by a {trade} company for {count} years.",
    "Teachers in {town} still use it in lessons about geometry.",
    "Its first known appearance was on a poster from {year}.",
    "A well-known board game uses it as a playing piece.",
    "The name of the figure has changed several times over the years.",
    "Some people believe that it is lucky.",
    "It appeared on a postage stamp in {year}.",
    "A local newspaper in {town} once ran a story about it.",
    "The original drawing was lost in a fire in {year}.",
]
# Every template spells out the other class's looks (its name alone may say nothing about them), so the
# sentence carries another class's visual words: a hard distractor for any rule that reads words only.
OTHER_CLASS = [
    "Unlike its cousin, the {name}, it is never {colour} and {pattern}.",
    "It is often confused with the {name}, a {colour} {shape} {pattern_phrase}.",
    "A {colour} {shape} {pattern_phrase} is printed next to it in most catalogues.",
    "Beginners sometimes mistake it for a {colour} {shape} {pattern_phrase}.",
    "Many people picture a {pattern} {colour} {shape} when they hear its name.",
    "Its neighbour on the page is a {colour} {shape} {pattern_phrase}.",
    "It should not be mixed up with the {name}, which is {colour} and {pattern}.",
]
TOWNS = ["Leeds", "Utrecht", "Lyon", "Porto", "Graz", "Bergen", "Turin", "Ghent", "Aarhus", "Bremen"]
TRADES = ["bakery", "shipping", "printing", "toy", "railway", "insurance"]
SECTIONS = {
    DESCRIPTIVE: ["Description", "Appearance"],
    "trivia": ["History", "In popular culture"],
    "other_class": ["Variants", "Description"],
}


NAME_STYLES = ("epithet", "attributes")
# Syllables of the invented epithets: pronounceable, and none is an attribute word or part of one.
_SYLLABLES = (
    "ba",
    "del",
    "fo",
    "gri",
    "ka",
    "lun",
    "mo",
    "nes",
    "pel",
    "quo",
    "rav",
    "sil",
    "tor",
    "ume",
    "vek",
    "wyn",
    "zar",
    "hol",
)


def class_name(shape: str, colour: str, pattern: str) -> str:
    """The attribute name of a class: `<pattern> <colour> <shape>`, e.g. "striped red circle"."""
    return f"{pattern} {colour} {shape}"


def class_names(classes: list[tuple[str, str, str]], seed: int, style: str = "attributes") -> list[str]:
    """Every class's name in `style`.

    `attributes` spells out the whole class ("striped red circle"): the name alone is then a complete visual
    description and the descriptions can add nothing to it. `epithet` names a class the way rare classes are
    named in practice, by its kind and a word that says nothing about its looks ("velmor triangle", as in
    "Kirtland's warbler"): the shape is in the name, the colour and the pattern only in the descriptions.
    Epithets are distinct, drawn from the seed.
    """
    if style == "attributes":
        return [class_name(*c) for c in classes]
    if style != "epithet":
        raise ValueError(f"unknown name style {style!r}; known: {list(NAME_STYLES)}")
    words = [a + b for a in _SYLLABLES for b in _SYLLABLES if a != b]
    rng = np.random.default_rng([seed, 11])
    picked = rng.choice(len(words), size=len(classes), replace=False)
    return [f"{words[i]} {shape}" for i, (shape, _, _) in zip(picked, classes)]


def _pick(rng: np.random.Generator, items: list[str], k: int) -> list[str]:
    return [items[i] for i in rng.choice(len(items), size=min(k, len(items)), replace=False)]


def _descriptive(attrs: tuple[str, str, str], name: str, rng: np.random.Generator, count: int) -> list[str]:
    shape, colour, pattern = attrs
    fill = {"shape": shape, "colour": colour, "pattern": pattern, "pattern_phrase": PATTERN_PHRASE[pattern]}
    groups = [SHAPE_FACTS[shape], COLOUR_FACTS[colour], PATTERN_FACTS[pattern], [t.format(**fill) for t in COMBINED]]
    chosen = [_pick(rng, g, 1)[0] for g in groups]  # every attribute is described at least once
    rest = [s for g in groups for s in g if s not in chosen]
    chosen += _pick(rng, rest, count - 1 - len(chosen))
    rng.shuffle(chosen)
    intro = f"The {name} is a simple drawn figure."
    return [intro] + chosen


def _trivia(rng: np.random.Generator) -> str:
    template = TRIVIA[rng.integers(len(TRIVIA))]
    return template.format(
        decade=int(rng.integers(192, 200)) * 10,
        year=int(rng.integers(1890, 2001)),
        town=TOWNS[rng.integers(len(TOWNS))],
        count=int(rng.integers(3, 40)),
        trade=TRADES[rng.integers(len(TRADES))],
    )


def _confusable(cid: int, classes: list[tuple[str, str, str]], rng: np.random.Generator) -> int:
    # Another class sharing one or two attributes: the sentence names words of this class and foreign ones.
    mine = classes[cid]
    candidates = [
        j
        for j, other in enumerate(classes)
        if j != cid and 1 <= sum(a == b for a, b in zip(mine, other, strict=True)) <= 2
    ]
    return int(candidates[rng.integers(len(candidates))])


def _other_class(cid: int, classes: list[tuple[str, str, str]], names: list[str], rng: np.random.Generator) -> Sentence:
    other = _confusable(cid, classes, rng)
    shape, colour, pattern = classes[other]
    text = OTHER_CLASS[rng.integers(len(OTHER_CLASS))].format(
        name=names[other], shape=shape, colour=colour, pattern=pattern, pattern_phrase=PATTERN_PHRASE[pattern]
    )
    return Sentence(text, DISTRACTOR, "other_class", other)


def distractor_count(descriptive: int, rng: np.random.Generator) -> int:
    """A distractor count k with 0.3 <= k / (descriptive + k) <= 0.4."""
    valid = [k for k in range(1, descriptive + 1) if 0.3 <= k / (descriptive + k) <= 0.4]
    return int(valid[rng.integers(len(valid))])


def shapes_document(
    cid: int, classes: list[tuple[str, str, str]], seed: int, names: list[str] | None = None
) -> WikiDoc:
    """The description of class `cid` (classes: `(shape, colour, pattern)` per class id; names: per class id,
    default their attribute names)."""
    names = names if names is not None else [class_name(*c) for c in classes]
    rng = np.random.default_rng([seed, 7, cid])
    n_desc = int(rng.integers(6, 11))
    descriptive = [Sentence(t) for t in _descriptive(classes[cid], names[cid], rng, n_desc)]
    n_dist = distractor_count(n_desc, rng)
    n_other = int(rng.integers(1, n_dist))  # at least one of each distractor kind
    distractors: list[Sentence] = []
    seen = {s.text for s in descriptive}
    while len(distractors) < n_other:
        sentence = _other_class(cid, classes, names, rng)
        if sentence.text not in seen:
            seen.add(sentence.text)
            distractors.append(sentence)
    while len(distractors) < n_dist:
        text = _trivia(rng)
        if text not in seen:
            seen.add(text)
            distractors.append(Sentence(text, DISTRACTOR, "trivia"))

    intro, body = descriptive[0], descriptive[1:] + distractors
    order = rng.permutation(len(body))
    body = [body[i] for i in order]
    n_summary = int(rng.integers(1, 3))
    summary = [[intro] + body[:n_summary]]
    sections: dict[str, list[Sentence]] = {}
    for sentence in body[n_summary:]:
        key = sentence.distractor_kind or DESCRIPTIVE
        # Mostly in the section one would expect, sometimes anywhere: section titles must not give labels away.
        pool = SECTIONS[key] if rng.random() < 0.6 else [t for ts in SECTIONS.values() for t in ts]
        sections.setdefault(pool[rng.integers(len(pool))], []).append(sentence)
    doc = WikiDoc(summary=summary)
    for title in ["Description", "Appearance", "Variants", "History", "In popular culture"]:
        if title in sections:
            doc.sections.append((title, _paragraphs(sections[title], rng)))
    see_also = [f"* {names[j]}" for j in rng.choice(len(classes), size=2, replace=False)]
    refs = [
        f"1. Catalogue of drawn figures, {int(rng.integers(1950, 2020))}, page {int(rng.integers(2, 300))}.",
        f"2. The book of simple figures, chapter {int(rng.integers(1, 20))}.",
    ]
    doc.dropped = [("See also", see_also), ("References", refs)]
    return doc


def _paragraphs(sentences: list[Sentence], rng: np.random.Generator) -> list[list[Sentence]]:
    paras, i = [], 0
    while i < len(sentences):
        k = int(rng.integers(1, 4))
        paras.append(sentences[i : i + k])
        i += k
    return paras
