"""Descriptions of the ten handwritten digits for Digits-LT.

Descriptive sentences talk about stroke topology with a shared vocabulary (loop, stroke, bar, curve, top,
bottom, left, right), so what is learned about a head digit's words transfers to tail digits. Distractors
are `trivia` (facts about the number, nothing visual) and `other_class` (another digit's visual signature).
"""

from __future__ import annotations

import numpy as np

from vlltr.training.benchmarks.layout import DISTRACTOR, Sentence, WikiDoc

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# A short visual signature per digit, used in the summary and in other digits' distractors.
SIGNATURE = {
    0: "is a single closed oval loop",
    1: "is a single vertical stroke",
    2: "ends with a flat bar along the bottom",
    3: "is two open curves bulging to the right",
    4: "has a horizontal bar crossing a vertical stroke",
    5: "has a flat bar on top and a round belly below",
    6: "has a closed loop at the bottom",
    7: "is a flat top bar with a long diagonal stroke",
    8: "has two closed loops stacked on top of each other",
    9: "has a closed loop at the top with a stroke below",
}
FACTS: dict[int, list[str]] = {
    0: [
        "It is drawn as a single closed loop.",
        "The loop is taller than it is wide, like an upright oval.",
        "It has no straight strokes.",
        "Its middle is empty.",
        "The pen returns to where it started, closing the curve at the top.",
        "Both its left and right sides are curved.",
        "It looks like a round egg standing on its end.",
        "The stroke keeps the same thickness all the way around.",
    ],
    1: [
        "It is mostly a single vertical stroke.",
        "It has no closed loop.",
        "A short flag often leans down to the left from the top.",
        "Some writers add a flat base under the stroke.",
        "It is the narrowest of the digits.",
        "Almost all of its ink lies in one straight line.",
        "It has no curves.",
        "The stroke runs from the top to the bottom of the box.",
    ],
    2: [
        "It starts with a curve at the top that bends to the right.",
        "A diagonal stroke runs from the upper right down to the lower left.",
        "It ends with a flat horizontal bar along the bottom.",
        "It has no closed loop.",
        "Its top looks like a hook.",
        "The bottom of the digit is a straight line.",
        "It is drawn in one continuous stroke.",
        "Its lower half is mostly straight while its upper half is curved.",
    ],
    3: [
        "It is made of two open curves stacked on top of each other.",
        "Both bumps bulge to the right.",
        "Its left side is open.",
        "The two curves meet at a point in the middle.",
        "It has no closed loop.",
        "It looks like a pair of stacked hooks opening to the left.",
        "It has no straight vertical stroke.",
        "The top curve is often a little smaller than the bottom one.",
    ],
    4: [
        "It has a vertical stroke on the right.",
        "A horizontal bar crosses the vertical stroke below the middle.",
        "A slanted stroke on the left comes down to meet the bar.",
        "It is built entirely from straight strokes.",
        "Its upper part often forms a closed triangle, though many writers leave it open at the top.",
        "It has sharp corners rather than curves.",
        "The crossing bar sticks out a little to the right of the vertical stroke.",
        "Its vertical stroke reaches lower than the rest of the digit.",
    ],
    5: [
        "It has a flat horizontal bar on top.",
        "A short vertical stroke drops from the left end of the top bar.",
        "Its lower half is an open curve bulging to the right.",
        "The bottom curve opens to the left.",
        "It has no closed loop.",
        "Its top is straight and its bottom is round.",
        "The pen is often lifted to add the top bar last.",
        "Its corner at the upper left is sharp.",
    ],
    6: [
        "It has a closed loop at the bottom.",
        "A long curved stroke sweeps down from the top into the loop.",
        "Its upper part is open on the right.",
        "The loop sits in the lower half of the digit.",
        "It has no straight strokes.",
        "It curls inward like a snail shell.",
        "The curve at the top leans to the right.",
        "Its left side is one long curve.",
    ],
    7: [
        "It has a flat horizontal bar across the top.",
        "A long diagonal stroke falls from the right end of the bar to the bottom.",
        "It has no closed loop.",
        "It is made of two straight strokes meeting at a sharp corner.",
        "Some writers add a short crossbar through the middle of the diagonal.",
        "Its lower half is a single slanted line.",
        "It has no curves.",
        "The bottom of the digit is narrow and ends at one point.",
    ],
    8: [
        "It has two closed loops stacked on top of each other.",
        "The upper loop is usually a little smaller than the lower one.",
        "The loops touch or cross at the middle.",
        "It has no straight strokes.",
        "It is symmetric from left to right.",
        "It looks like a snowman or an hourglass.",
        "It is drawn in one continuous stroke that crosses itself.",
        "Both its halves are closed.",
    ],
    9: [
        "It has a closed loop at the top.",
        "A stroke runs down from the right side of the loop.",
        "The tail below the loop is straight or slightly curved.",
        "The loop sits in the upper half of the digit.",
        "Its lower part is a single stroke.",
        "It looks like a balloon on a string.",
        "Its lower left side is open.",
        "The vertical stroke on the right reaches the bottom.",
    ],
}
TRIVIA: dict[int, list[str]] = {
    0: [
        "The idea of zero as a number was developed in India.",
        "Zero is the only number that is neither positive nor negative.",
    ],
    1: ["One is the first positive whole number.", "In football, the number one shirt is worn by the goalkeeper."],
    2: ["Two is the only even prime number.", "Many languages have a special grammatical form for pairs."],
    3: ["Three is often considered a lucky number.", "Many stories are told in three parts."],
    4: ["In parts of East Asia, four is considered unlucky.", "A leap year comes every four years."],
    5: ["Five is the number of fingers on a human hand.", "Many coins are worth five units of money."],
    6: ["A standard die has six faces.", "Insects have six legs."],
    7: ["There are seven days in a week.", "Seven is often called a lucky number in Western countries."],
    8: ["Spiders have eight legs.", "In China, eight is considered a lucky number."],
    9: ["A baseball team fields nine players.", "Cats are said to have nine lives."],
}
OTHER_CLASS = [
    "Unlike this digit, the {other} {signature}.",
    "It is sometimes mistaken for the {other}, which {signature}.",
    "On a calculator display, the {other} {signature}.",
]


def digit_name(digit: int) -> str:
    """The class name of a digit, e.g. "digit three"."""
    return f"digit {DIGIT_WORDS[digit]}"


def digits_document(digit: int, seed: int) -> WikiDoc:
    """The description of one digit: 6-8 descriptive sentences, 1-2 trivia, 1 other-digit distractor."""
    rng = np.random.default_rng([seed, 11, digit])
    intro = Sentence(f"The handwritten {digit_name(digit)} {SIGNATURE[digit]}.")
    facts = FACTS[digit]
    picked = [Sentence(facts[i]) for i in rng.choice(len(facts), size=int(rng.integers(5, 8)), replace=False)]
    trivia = [Sentence(t, DISTRACTOR, "trivia") for t in TRIVIA[digit][: int(rng.integers(1, 3))]]
    other = int(rng.choice([d for d in range(10) if d != digit]))
    template = OTHER_CLASS[rng.integers(len(OTHER_CLASS))]
    confusable = Sentence(
        template.format(other=digit_name(other), signature=SIGNATURE[other]), DISTRACTOR, "other_class", other
    )
    split = int(rng.integers(2, len(picked)))
    shape_section = picked[:split]
    writing_section = picked[split:] + [confusable]
    order = rng.permutation(len(writing_section))
    writing_section = [writing_section[i] for i in order]
    doc = WikiDoc(summary=[[intro]])
    doc.sections.append(("Shape", [shape_section[i : i + 2] for i in range(0, len(shape_section), 2)]))
    doc.sections.append(("Writing", [writing_section]))
    doc.sections.append(("History", [trivia]))
    doc.dropped = [("References", ["1. Handwriting of numerals, an illustrated guide, page 12."])]
    return doc
