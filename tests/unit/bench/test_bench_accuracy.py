"""The accuracy client's prompt, answer extraction and scoring rules."""
from __future__ import annotations

from kvyard.bench.accuracy import gold, predicted, render

MATH = {"question": "What is 2 + 3?", "answer": "Two plus three is 5.\n#### 5"}
MC = {"question": "Which is a fruit?", "choices": ["Rock", "Apple"], "answer": "B"}


def test_gsm8k_style():
    assert gold(MATH, "gsm8k") == "5"
    assert render(MATH, "gsm8k", True).endswith("Two plus three is 5. The answer is 5.\n\n")
    assert render(MATH, "gsm8k", False) == "Question: What is 2 + 3?\nAnswer:"
    assert predicted(" 2 + 3 = 5. The answer is 5.\n\nQuestion: 7", "gsm8k") == "5"
    assert predicted(" It costs 1,200 dollars.", "gsm8k") == "1200"
    assert predicted(" I do not know", "gsm8k") is None


def test_mmlu_style():
    assert gold(MC, "mmlu") == "B" and gold({**MC, "answer": 0}, "mmlu") == "A"
    assert render(MC, "mmlu", False) == "Question: Which is a fruit?\nA. Rock\nB. Apple\nAnswer:"
    assert predicted(" B", "mmlu") == "B" and predicted(" b.", "mmlu") == "B" and predicted(" ?", "mmlu") is None
