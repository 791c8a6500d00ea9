"""The preprocessing encoder: conversations (a template's segments) to token ids and learned-token
flags, a chunk of conversations at a time into flat arrays, as `data/preprocess.py` writes them.
One conversation's encoding, which generation shares, is `templates.encode_segment_arrays`.
"""
import numpy as np

from mindsft.templates import encode_segment_arrays, one_text, overlap_mask


def encode_segment_batch(tokenizer, segments_list):
    """`encode_segment_arrays` of each conversation in `segments_list`, as a list; a tokenizer.json
    encodes them all in one call."""
    if not tokenizer.parses_special_text:
        return [encode_segment_arrays(tokenizer, segments) for segments in segments_list]
    texts_and_spans = [one_text(tokenizer, segments) for segments in segments_list]
    encoded = tokenizer.encode_spans_batch([text for text, _ in texts_and_spans])
    return [(ids.astype(np.int32), overlap_mask(begins, ends, spans))
            for (ids, begins, ends), (_, spans) in zip(encoded, texts_and_spans)]


def chunk_texts(tokenizer, segments_list):
    """What the tokenizer encodes of a chunk: each conversation's text and learned byte spans (a
    tokenizer.json), or the segments themselves.

    A chunk is encoded in three stages, `chunk_texts` -> `encode_chunk_texts` -> `chunk_arrays`,
    into three flat arrays: ids (int32) and learned flags (bool) of the conversations one after
    another, and each one's token count (int64); a byte-level tokenizer.json encodes the chunk as
    one stream of spans, with no arrays per conversation. The middle stage is the tokenizer's,
    which a thread can run while the others run for other chunks."""
    if tokenizer.parses_special_text:
        return [one_text(tokenizer, segments) for segments in segments_list]
    return segments_list


def encode_chunk_texts(tokenizer, texts):
    if tokenizer.parses_special_text:
        return tokenizer.encode_in_library([text for text, _ in texts])
    pairs = encode_segment_batch(tokenizer, texts)
    lengths = np.fromiter((len(ids) for ids, _ in pairs), np.int64, len(pairs))
    if not pairs:
        return np.zeros(0, np.int32), np.zeros(0, bool), lengths
    return (np.concatenate([ids for ids, _ in pairs]).astype(np.int32),
            np.concatenate([learned for _, learned in pairs]).astype(bool), lengths)


def chunk_arrays(tokenizer, texts, encoded):
    """(ids, learned flags, token counts) of a chunk from `encode_chunk_texts`'s result."""
    if not tokenizer.parses_special_text:
        return encoded
    ids, begins, ends, lengths, starts = tokenizer.encode_spans_flat([text for text, _ in texts], encoded)
    spans = [(start + begin, start + end)
             for start, (_, text_spans) in zip(starts.tolist(), texts) for begin, end in text_spans]
    return ids.astype(np.int32), _stream_overlap_mask(begins, ends, spans), lengths


def _stream_overlap_mask(begins, ends, spans):
    """`overlap_mask` of many spans at once (a chunk's): each span marks the slice of tokens it
    overlaps through +1/-1 at its edges, without a Python step per span."""
    edges = np.zeros(len(begins) + 1, np.int64)
    if spans:
        bounds = np.asarray(spans, np.int64).reshape(-1, 2)
        first = np.searchsorted(ends, bounds[:, 0], side="right")
        stop = np.searchsorted(begins, bounds[:, 1], side="left")
        hit = first < stop
        np.add.at(edges, first[hit], 1)
        np.add.at(edges, stop[hit], -1)
    return np.cumsum(edges[:-1]) > 0
