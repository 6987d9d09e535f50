import pytest

from hitq.benchmark.answer import extract, is_answer_complete


@pytest.mark.parametrize("raw, expected", [
    ("reasoning...\n[Final Answer]: 1955, 62170\n", "1955, 62170"),
    ("[Final Answer]: first\n[Final Answer]:  second  ", "second"),  # the last marker wins
    ("so the Final Answer: Yes", "Yes"),  # loose marker only without the bracketed one
    ("Final Answer: no\n[Final Answer]: yes", "yes"),
    ("[Final Answer]:", ""),
    ("no marker at all", None),
    ("[Final Answer]: import pandas as pd\nimport matplotlib.pyplot as plt\nplt.show()",
     "import pandas as pd\nimport matplotlib.pyplot as plt\nplt.show()"),
])
def test_extract(raw, expected):
    assert extract(raw) == expected


@pytest.mark.parametrize("text, done", [
    ("thinking", False),
    ("[Final Answer]: 42", False),  # the line may still grow
    ("[Final Answer]: 42\n", True),
    ("[Final Answer]:\n", False),
    ("[Final Answer]:  \n\n", False),
    ("[Final Answer]:\nYes\n", True),
    ("[Final Answer]: a\n more text [Final Answer]: b", False),  # a newer marker restarts
])
def test_is_answer_complete(text, done):
    assert is_answer_complete(text) is done
