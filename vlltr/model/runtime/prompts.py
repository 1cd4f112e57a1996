"""Prompt templates that turn a class name into sentences (CLIP's zero-shot prompts).

One definition for training (class-name sentences in each class's text pool), the benchmark's zero-shot arm
and the service, which encodes a new class's name this way to choose its anchors without images.
"""

from __future__ import annotations

# CLIP's 7-template subset, chosen on ImageNet by its authors.
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def name_prompts(name: str, templates: tuple[str, ...] = SIMPLE_TEMPLATES) -> list[str]:
    """`name` in each template, e.g. "itap of a red fox."."""
    return [t.format(name) for t in templates]
