"""Evaluation by generation (LLaMA-Factory's `predict_with_generate`): the model answers the
prompts of the first N eval records, and its replies are scored against the records' own replies
with BLEU-4 and ROUGE-1/2/L (`mindsft.metrics`). Used every `eval_step_interval` steps of a
training run with `do_eval`, and by run_mode eval, so both give the same figures on the same weights.
"""
import mindspore.dataset as ds
import numpy as np

from mindsft.data.schema import IGNORE_INDEX
from mindsft.errors import ConfigError
from mindsft.generate import GenerationConfig, Generator
from mindsft.metrics import similarity_scores
from mindsft.tokenizer import load_tokenizer


def reply_samples(files, limit):
    """[(prompt ids, reference reply ids)] of the first `limit` records holding a learned reply:
    the prompt is every token before the first learned one, the reference the run of learned
    tokens that follows (the EOS closing it left out). Records are read in file order."""
    samples = []
    dataset = ds.MindDataset(list(files), columns_list=["input_ids", "labels"], shuffle=False)
    for record in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        learned = np.flatnonzero(record["labels"] != IGNORE_INDEX)
        if learned.size == 0:
            continue
        start = int(learned[0])
        gaps = np.flatnonzero(np.diff(learned) != 1)
        end = int(learned[gaps[0]]) + 1 if gaps.size else int(learned[-1]) + 1
        samples.append((record["input_ids"][:start].tolist(), record["input_ids"][start:end].tolist()))
        if len(samples) == limit:
            break
    return samples


class GenerationEval:
    """Generates for a fixed set of eval prompts and scores the replies; keeps one Generator, so
    the graphs compile at the first evaluation only."""

    def __init__(self, model, tokenizer, samples, generation_config=None, batch_size=8):
        config = generation_config if isinstance(generation_config, GenerationConfig) \
            else GenerationConfig.from_mapping(generation_config or {})
        if config.eos_token_id is None:
            config = config.updated(eos_token_id=tokenizer.eos_id)
        if config.pad_token_id is None:
            config = config.updated(pad_token_id=tokenizer.pad_id)
        self.config, self.tokenizer, self.batch_size = config, tokenizer, batch_size
        self.stop_ids = config.stop_ids(model.config)
        self.generator = Generator(model)
        self.prompts = [prompt for prompt, _ in samples]
        self.references = [self.decode(reply) for _, reply in samples]

    @classmethod
    def from_config(cls, config, model, dataset_files):
        """From a run config: `eval_dataset.generate_samples` records of the eval data, the
        tokenizer `processor.tokenizer.vocab_file`, the settings of `generation_config`."""
        vocab_file = config.processor.tokenizer.vocab_file
        if not vocab_file:
            raise ConfigError("eval_dataset.predict_with_generate needs the tokenizer to read replies: set "
                              "processor.tokenizer.vocab_file (--processor.tokenizer.vocab_file PATH)")
        samples = reply_samples(dataset_files, config.eval_dataset.generate_samples)
        if not samples:
            raise ConfigError("eval_dataset.predict_with_generate: no eval record holds a learned reply to compare with")
        tokenizer = load_tokenizer(vocab_file, config.processor.tokenizer.merges_file)
        return cls(model, tokenizer, samples, config.generation_config)

    def decode(self, tokens):
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    def predictions(self):
        # Similar lengths share a batch so that little padding is computed.
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))
        replies = [None] * len(order)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            output = self.generator.generate([self.prompts[i] for i in rows], self.config)
            for row, sequence in zip(rows, output.sequences):
                replies[row] = self.decode(sequence)
        return replies

    def __call__(self):
        """{"eval_bleu-4": ..., "eval_rouge-1": ..., "eval_rouge-2": ..., "eval_rouge-l": ...}."""
        scores = similarity_scores(self.predictions(), self.references)
        return {f"eval_{name}": value for name, value in scores.items()}
