"""BLEU-4 and ROUGE-1/2/L equal what nltk and rouge_chinese compute with LLaMA-Factory's recipe."""
import math

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from mindsft.metrics import rouge_scores, sample_scores, sentence_bleu4, similarity_scores

PAIRS = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("我爱北京天安门。天安门上太阳升！", "我爱北京天安门，天安门上太阳升。"),
    ("今天天气很好，我们去公园散步吧。", "今天的天气非常好，适合去公园散步。"),
    ("a", "completely different words here"),
    ("repeat repeat repeat repeat", "repeat once"),
    ("Mixed 中文 and English 文本……还有省略号", "中文 and English 的混合文本。"),
    ("", "an empty prediction scores zero"),
    ("   ", "only spaces"),
]


def reference_sample_scores(prediction, label):
    """LLaMA-Factory's per-sample computation, with the reference libraries."""
    hypothesis, reference = list(jieba.cut(prediction)), list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    scores = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


@pytest.mark.parametrize("prediction,label", PAIRS)
def test_sample_scores_equal_llama_factory_recipe_with_nltk_and_rouge_chinese(prediction, label):
    assert sample_scores(prediction, label) == reference_sample_scores(prediction, label)


def test_bleu_on_a_hand_checked_example():
    # hypothesis "a b c d", reference "a b c e": precisions 3/4, 2/3, 1/2, then no 4-gram match
    # → NIST smoothing 1/(2·1); equal lengths → no brevity penalty.
    hypothesis, reference = list("abcd"), list("abce")
    expected = math.exp(0.25 * (math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)))
    assert sentence_bleu4(reference, hypothesis) == pytest.approx(expected, abs=1e-12)
    nltk_value = sentence_bleu([reference], hypothesis, smoothing_function=SmoothingFunction().method3)
    assert sentence_bleu4(reference, hypothesis) == pytest.approx(nltk_value, abs=1e-12)


def test_bleu_brevity_penalty_and_no_unigram_match_equal_nltk():
    smoothing = SmoothingFunction().method3
    cases = [(list("abcdefgh"), list("abc")), (list("xyz"), list("abc")), (list("ab"), list("abab")),
             (list("abcdefghij"), list("abcdefghij"))]
    for reference, hypothesis in cases:
        expected = sentence_bleu([reference], hypothesis, smoothing_function=smoothing)
        assert sentence_bleu4(reference, hypothesis) == pytest.approx(expected, abs=1e-12)


def test_rouge_on_a_hand_checked_example():
    # hyp words {the, cat, sat}, ref {the, cat, ran, away}: 2 shared unigrams → P 2/3, R 2/4;
    # bigram "the cat" shared → P 1/2, R 1/3; LCS "the cat" → P 2/3, R 2/4.
    scores = rouge_scores("the cat sat", "the cat ran away")
    f1 = 2 * (2 / 3 * 2 / 4) / (2 / 3 + 2 / 4 + 1e-8)
    f2 = 2 * (1 / 2 * 1 / 3) / (1 / 2 + 1 / 3 + 1e-8)
    assert scores["rouge-1"] == pytest.approx(f1, abs=1e-12)
    assert scores["rouge-2"] == pytest.approx(f2, abs=1e-12)
    assert scores["rouge-l"] == pytest.approx(f1, abs=1e-12)
    reference = Rouge().get_scores("the cat sat", "the cat ran away")[0]
    for name in ("rouge-1", "rouge-2", "rouge-l"):
        assert scores[name] == pytest.approx(reference[name]["f"], abs=1e-12)


def test_similarity_scores_are_means_of_sample_scores():
    predictions, labels = zip(*PAIRS)
    got = similarity_scores(list(predictions), list(labels))
    per_sample = [reference_sample_scores(p, l) for p, l in PAIRS]
    for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert got[name] == pytest.approx(float(np.mean([s[name] for s in per_sample])), abs=1e-9)


def test_similarity_scores_reject_unequal_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        similarity_scores(["a", "b"], ["a"])
