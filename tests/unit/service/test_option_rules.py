"""The item rules of a classify request's candidate labels and subset names, shared by the engine's check and
the HTTP layer's check of a query list that the JSON body replaces."""

import pytest

from vlltr.service.explain import MAX_LABEL_CHARS, MAX_SUBSET_NAME_CHARS, broken_item_rule


@pytest.mark.parametrize(
    "values,label,expected",
    [
        (["a cat", "a dog"], True, None),
        (["x" * MAX_LABEL_CHARS], True, None),
        (["a cat", "   "], True, "labels[1]: a label needs 1 to 200 non-blank characters"),
        (["x" * (MAX_LABEL_CHARS + 1)], True, "labels[0]: a label needs 1 to 200 non-blank characters"),
        (["a cat", "a cat"], True, "labels: each candidate label may appear once"),
        (["class 1", "class 1"], False, None),  # repeating a served name selects it once; not an error
        (["   "], False, None),  # a name is matched as given; only its length is a rule
        ([""], False, "labels[0]: a class name has 1 to 200 characters"),
        (["y" * (MAX_SUBSET_NAME_CHARS + 1)], False, "labels[0]: a class name has 1 to 200 characters"),
        ([], True, None),
    ],
)
def test_broken_item_rule(values, label, expected):
    assert broken_item_rule("labels", values, label=label) == expected


def test_the_message_names_the_list_it_was_given():
    assert broken_item_rule("query.labels", [""], label=True) == (
        "query.labels[0]: a label needs 1 to 200 non-blank characters"
    )
