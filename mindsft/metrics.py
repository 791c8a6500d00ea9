"""BLEU-4 and ROUGE-1/2/L of generated text against labels, as LLaMA-Factory scores predictions.

Its recipe: ROUGE on jieba word segmentation with rouge_chinese (unique n-gram overlap for
ROUGE-1/2, longest common subsequence over all words for ROUGE-L, F-scores), BLEU-4 on
characters with nltk's `sentence_bleu` and NIST geometric smoothing (method 3); every score
×100 and rounded to 4 decimals per sample, then averaged. Implemented here so that scoring
needs only jieba; the tests compare with nltk and rouge_chinese themselves.
"""
import logging
import math
import re
from collections import Counter

import numpy as np

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def segment_words(text):
    """jieba's words of `text` (Chinese split into words, other text on spaces and punctuation)."""
    import jieba
    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text))


def ngram_counts(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu4(reference, hypothesis):
    """BLEU-4 of one hypothesis against one reference (token lists), equal to nltk's
    `sentence_bleu([reference], hypothesis, smoothing_function=SmoothingFunction().method3)`."""
    matches, totals = [], []
    for n in range(1, 5):
        hyp_counts = ngram_counts(hypothesis, n)
        ref_counts = ngram_counts(reference, n)
        matches.append(sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items()))
        totals.append(max(1, sum(hyp_counts.values())))
    if matches[0] == 0:
        return 0.0
    log_sum = []
    zero_matches_seen = 0
    for match, total in zip(matches, totals):
        if match == 0:
            # NIST smoothing: the k-th order with no match counts as 1 / (2^k · total).
            zero_matches_seen += 1
            precision = 1.0 / (2 ** zero_matches_seen * total)
        else:
            precision = match / total
        log_sum.append(0.25 * math.log(precision))
    hyp_len, ref_len = len(hypothesis), len(reference)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(math.fsum(log_sum))


def split_sentences(paragraph):
    """rouge_chinese's sentence split (after 。！？? … ...... and closing quotes)."""
    paragraph = re.sub(r"([。！？?])([^”’])", r"\1\n\2", paragraph)
    paragraph = re.sub(r"(\.{6})([^”’])", r"\1\n\2", paragraph)
    paragraph = re.sub(r"(…{2})([^”’])", r"\1\n\2", paragraph)
    paragraph = re.sub(r"([。！？?][”’])([^，。！？?])", r"\1\n\2", paragraph)
    return paragraph.rstrip().split("\n")


def rouge_words(text):
    """The word list rouge_chinese scores: sentences with whitespace collapsed, split on spaces."""
    words = []
    for sentence in split_sentences(text):
        if sentence:
            words.extend(" ".join(sentence.split()).split(" "))
    return words


def f_score(overlap, hyp_count, ref_count):
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def longest_common_subsequence(a, b):
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_scores(hypothesis_text, reference_text):
    """ROUGE-1/2/L F-scores (0..1) of space-separated words, as rouge_chinese's `Rouge().get_scores`."""
    hyp_words, ref_words = rouge_words(hypothesis_text), rouge_words(reference_text)
    scores = {}
    for n in (1, 2):
        hyp_grams, ref_grams = set(ngram_counts(hyp_words, n)), set(ngram_counts(ref_words, n))
        scores[f"rouge-{n}"] = f_score(len(hyp_grams & ref_grams), len(hyp_grams), len(ref_grams))
    lcs = longest_common_subsequence(ref_words, hyp_words)
    scores["rouge-l"] = f_score(lcs, len(hyp_words), len(ref_words))
    return scores


def sample_scores(prediction, label):
    """LLaMA-Factory's per-sample scores (×100, rounded to 4 decimals) of one prediction."""
    hypothesis, reference = segment_words(prediction), segment_words(label)
    if not " ".join(hypothesis).split() or not " ".join(reference).split():
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = rouge_scores(" ".join(hypothesis), " ".join(reference))
    result = {name: round(value * 100, 4) for name, value in scores.items()}
    result["bleu-4"] = round(sentence_bleu4(list(label), list(prediction)) * 100, 4)
    return result


def similarity_scores(predictions, labels):
    """Mean BLEU-4 and ROUGE-1/2/L (×100) over prediction/label pairs."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    per_sample = [sample_scores(p, l) for p, l in zip(predictions, labels)]
    if not per_sample:
        return {name: 0.0 for name in METRIC_NAMES}
    return {name: float(np.mean([s[name] for s in per_sample])) for name in METRIC_NAMES}
