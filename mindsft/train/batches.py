"""Reading MindRecord shards for training: one global sample order, each rank its slice.

The order of samples is a permutation of the whole dataset drawn from (seed, epoch), fixed
before anything is split. Global batch s is order[s*G:(s+1)*G]; accumulation micro-step k of
rank r takes its `batch_size` samples at offset (k*dp + r)*batch_size. So the set of samples in
an optimizer step does not depend on how many ranks or micro-steps share it, and resuming at
step s reads exactly what an uninterrupted run would have read.

A micro-batch is a dict of the named columns of `mindsft.data.schema.BATCH_COLUMNS`. Packed
rows (an `actual_seq_len` column) come with their boundaries padded to the dataset's largest
count of samples in a row (repeating the row length), so every batch has one shape. Unpacked
rows can be cut to their batch's longest learned position rounded up to a multiple
(`pad_to_multiple_of`): a few shapes, each compiled once, instead of always the full row.
"""
import numpy as np
import mindspore.dataset as ds

from mindsft.data.schema import (BATCH_COLUMNS, BATCH_DTYPES, IGNORE_INDEX, PACKED_COLUMN, PAIR_COLUMNS, PAIR_DTYPES,
                                  TARGET_IDS_COLUMNS, dataset_manifest, mindrecord_files, record_length)
from mindsft.data.split import recorded_eval_dataset_dir
from mindsft.errors import DataError


def build_data(config, dataset, rank, world_size, train=True):
    """The ShardedBatches of a run config's train_dataset (train) or eval_dataset (in order, whole)."""
    dataset_dir = dataset.data_loader.dataset_dir
    if not train and not dataset_dir:
        # llama_preprocess --val_size wrote eval records beside the train ones and recorded where.
        dataset_dir = recorded_eval_dataset_dir(config.train_dataset.data_loader.dataset_dir)
    batches = ShardedBatches(
        dataset_dir, config.model_config.seq_length, config.runner_config.batch_size,
        data_parallel=world_size, rank=rank,
        accumulation_steps=config.runner_config.gradient_accumulation_steps if train else 1,
        shuffle=dataset.data_loader.shuffle if train else False, seed=config.seed,
        drop_remainder=dataset.drop_remainder if train else False, pad_to_multiple_of=dataset.pad_to_multiple_of,
        what="train_dataset" if train else "eval_dataset", input_columns=dataset.input_columns)
    if batches.column_note and rank == 0:
        print(batches.column_note, flush=True)
    return batches


class ShardedBatches:
    """Micro-batches of one rank, in the global order above. Reads only this rank's records."""

    def __init__(self, dataset_dir, seq_length, batch_size, data_parallel=1, rank=0,
                 accumulation_steps=1, shuffle=True, seed=0, drop_remainder=True, pad_to_multiple_of=0,
                 what="train_dataset", input_columns=BATCH_COLUMNS):
        if not dataset_dir:
            raise DataError(f"{what}.data_loader.dataset_dir is not set (give --{what}_dir)")
        try:
            self.files = mindrecord_files(dataset_dir)
        except DataError as exc:
            raise DataError(f"{what}: {exc}") from None
        self.dataset_dir = dataset_dir
        # Read now, so a damaged stats file is named before the model is built.
        self.manifest = dataset_manifest(dataset_dir)
        try:
            probe = ds.MindDataset(self.files, shuffle=False)
            self.num_records = probe.get_dataset_size()
        except RuntimeError as exc:  # mindrecord_files checked what it can; MindSpore found more
            raise DataError(f"{dataset_dir}: MindSpore cannot read these MindRecord files "
                            f"({str(exc).strip().splitlines()[0][:200]})") from None
        known = BATCH_COLUMNS + TARGET_IDS_COLUMNS
        unknown = [c for c in input_columns if c not in known]
        if unknown:
            raise DataError(f"{what}.input_columns: {', '.join(unknown)} is not a column the model takes "
                            f"({', '.join(known)})")
        held = probe.get_col_names()
        # The data's layout decides: mindsft's (input_ids, labels) or MindFormers' Qwen2 one
        # (input_ids, target_ids, attention_mask). As MindFormers: a config whose input_columns
        # name no targets (pretraining: input_ids only) learns every token of qa records too.
        # Sample boundaries are read whenever the records hold them, listed or not: packed rows
        # computed without them would mix their samples.
        wants_targets = any(c in input_columns for c in ("labels", "target_ids"))
        # Preference pairs (`mindsft.data.pairwise`) are read whole; their batches also carry each
        # row's record index (`record_index`, -1 for padding), which precomputed reference
        # log-probabilities are looked up by.
        self.pairwise = all(c in held for c in PAIR_COLUMNS)
        self.target_ids = not self.pairwise and wants_targets and all(c in held for c in TARGET_IDS_COLUMNS)
        if self.pairwise:
            self.columns = list(PAIR_COLUMNS)
        elif self.target_ids:
            self.columns = list(TARGET_IDS_COLUMNS)
        else:
            self.columns = [c for c in BATCH_COLUMNS if (c in input_columns or c == PACKED_COLUMN
                                                         or (c == "labels" and wants_targets)) and c in held]
        missing = [c for c in input_columns if c not in held]
        self.column_note = None
        if missing and "input_ids" in held:
            self.column_note = (f"{what}.input_columns {', '.join(input_columns)}: the records in {dataset_dir} "
                                f"hold {', '.join(held)}; trained on those "
                                f"({'labels: the tokens they mark' if 'labels' in self.columns else 'every token'})")
        if "input_ids" not in self.columns and not self.pairwise:
            raise DataError(f"{dataset_dir}: records have no 'input_ids' column (columns: {held})")
        if self.num_records == 0:
            raise DataError(f"{dataset_dir}: the dataset is empty (0 records)")
        first = next(probe.create_dict_iterator(num_epochs=1, output_numpy=True))
        self.record_length = int(first[self.columns[0]].shape[0])
        # MindFormers' Qwen2 rows are seq_length + 1 tokens or seq_length (its model drops the last
        # input token either way).
        lengths = (record_length(seq_length), seq_length) if self.target_ids else (record_length(seq_length),)
        if self.record_length not in lengths:
            raise DataError(f"{dataset_dir}: records hold {self.record_length} tokens but model seq_length "
                            f"{seq_length} needs {record_length(seq_length)} (seq_length + 1)")
        self.packed = PACKED_COLUMN in self.columns
        self.boundary_count = boundary_count(self.files, self.record_length) if self.packed else 0
        # Packed rows are full already; cutting them would only add shapes.
        self.pad_to_multiple_of = 0 if self.packed else (pad_to_multiple_of or 0)
        self.lengths_seen = set()
        self.batch_size, self.data_parallel, self.rank = batch_size, data_parallel, rank
        self.accumulation_steps = accumulation_steps
        self.global_batch = batch_size * data_parallel * accumulation_steps
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        if drop_remainder:
            self.steps_per_epoch = self.num_records // self.global_batch
        else:
            self.steps_per_epoch = -(-self.num_records // self.global_batch)
        if self.steps_per_epoch == 0:
            raise DataError(f"{dataset_dir}: {self.num_records} records are fewer than one global batch "
                            f"of {self.global_batch} (batch_size {batch_size} x data_parallel {data_parallel} "
                            f"x gradient_accumulation_steps {accumulation_steps})")

    @property
    def dropped_per_epoch(self):
        return self.num_records - self.steps_per_epoch * self.global_batch if self.drop_remainder else 0

    def global_order(self, epoch):
        """Record indices of the whole dataset in epoch `epoch`'s order; -1 marks padding."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
        else:
            order = np.arange(self.num_records)
        needed = self.steps_per_epoch * self.global_batch
        if needed > self.num_records:
            order = np.concatenate([order, np.full(needed - self.num_records, -1)])
        return order[:needed]

    def rank_indices(self, epoch, start_step=0):
        """[steps, accumulation, batch] record indices this rank reads from `start_step` on."""
        order = self.global_order(epoch).reshape(self.steps_per_epoch, self.accumulation_steps,
                                                 self.data_parallel, self.batch_size)
        return order[start_step:, :, self.rank, :]

    def epoch(self, epoch, start_step=0):
        """Yield, per optimizer step, a list of `accumulation_steps` micro-batches (dicts of columns)."""
        indices = self.rank_indices(epoch, start_step)
        if indices.size == 0:
            return
        flat = indices.reshape(-1)
        # Padding slots (drop_remainder False, at the end of the order, so at the end of each
        # rank's slice) repeat a row read and learn nothing. They are added here, not read:
        # SubsetSampler refuses more indices than the dataset holds.
        real = flat[flat >= 0]
        reader = ds.MindDataset(self.files, columns_list=self.columns,
                                sampler=ds.SubsetSampler(real.tolist() if real.size else [0]), shuffle=None)
        if self.packed:
            reader = reader.padded_batch(self.batch_size,
                                         pad_info={PACKED_COLUMN: ([self.boundary_count], self.record_length)})
        else:
            reader = reader.batch(self.batch_size)
        read = (learned_batch(row) for row in reader.create_dict_iterator(num_epochs=1, output_numpy=True))
        micro = []
        template = None  # a row read, learning nothing: what padding slots hold
        for position in range(flat.size // self.batch_size):
            batch = next(read, None)
            if batch is not None and template is None:
                template = padding_rows(batch, 1)
            if not real.size:  # this rank's slice is all padding; the one row read stands in
                batch = None
            if batch is None:
                batch = padding_rows(template, self.batch_size)
            elif len(batch[self.columns[0]]) < self.batch_size:
                fill = padding_rows(template, self.batch_size - len(batch[self.columns[0]]))
                batch = {name: np.concatenate([column, fill[name]]) for name, column in batch.items()}
            if self.pad_to_multiple_of:
                batch = cut_to_learned(batch, self.pad_to_multiple_of)
            self.lengths_seen.add(batch[self.columns[0]].shape[1])
            if self.pairwise:
                batch["record_index"] = flat[position * self.batch_size:(position + 1) * self.batch_size]
            micro.append(batch)
            if len(micro) == self.accumulation_steps:
                yield micro
                micro = []

    def batches(self, epoch=0):
        """Every micro-batch of this rank in one epoch, one after another (evaluation)."""
        for micro_batches in self.epoch(epoch):
            yield from micro_batches


def padding_rows(batch, count):
    """A batch's first row with nothing learned, `count` times."""
    first = {name: column[:1] for name, column in batch.items()}
    for name in label_columns(first):
        first[name] = np.full_like(first[name], IGNORE_INDEX)
    return {name: np.repeat(column, count, 0) for name, column in first.items()}


def label_columns(batch):
    """The label columns of a batch: `labels`, or a pair's `chosen_labels` and `rejected_labels`."""
    return [name for name in batch if name.endswith("labels")]


def learned_batch(columns):
    """The batch the model takes, from the columns read: every column int32, and `labels` for
    data without them (pretraining text, which has no padding) equal to input_ids.

    Which targets are learned comes from the labels alone. MindFormers also unlearns every
    target equal to the pad id, which with Llama 3 (pad = id 0 = "!") would unlearn real text.
    """
    if all(name in columns for name in PAIR_COLUMNS):
        return {name: np.asarray(columns[name], PAIR_DTYPES[name]) for name in PAIR_COLUMNS}
    batch = {name: np.asarray(columns[name], BATCH_DTYPES[name]) for name in BATCH_COLUMNS if name in columns}
    if "target_ids" in columns:
        batch["labels"] = target_ids_labels(columns["target_ids"], columns["attention_mask"])
    else:
        batch["labels"] = batch["labels"].copy() if "labels" in batch else batch["input_ids"].copy()
    return batch


def target_ids_labels(target_ids, attention_mask):
    """`labels` of MindFormers' Qwen2 layout, as its LlamaForCausalLM trains it: the target of
    position t is target_ids[t + 1], learned where attention_mask[t] is 1 (its input mask: the input
    token is not padding) and the target is not -100. Labels are stored unshifted, so
    labels[t + 1] carries it."""
    target_ids = np.asarray(target_ids, np.int32)
    learned = (np.asarray(attention_mask)[:, :-1] == 1) & (target_ids[:, 1:] != IGNORE_INDEX)
    labels = np.full_like(target_ids, IGNORE_INDEX)
    labels[:, 1:] = np.where(learned, target_ids[:, 1:], IGNORE_INDEX)
    return labels


def cut_to_learned(batch, multiple):
    """The batch cut after its last learned target, rounded up to `multiple` tokens (never past
    the row): a position only sees those before it, so what is cut changes no loss."""
    learned = np.any([(batch[name] != IGNORE_INDEX).any(0) for name in label_columns(batch)], 0)
    last = int(np.nonzero(learned)[0].max()) + 1 if learned.any() else 1
    length = min(learned.shape[0], -(-last // multiple) * multiple)
    return {name: column[:, :length] for name, column in batch.items()}


def boundary_count(files, row_length):
    """The most samples in one packed row (boundaries per row), after checking every row's
    boundaries: increasing offsets within the row."""
    reader = ds.MindDataset(files, columns_list=[PACKED_COLUMN], shuffle=False)
    most = 0
    for index, row in enumerate(reader.create_tuple_iterator(num_epochs=1, output_numpy=True)):
        ends = np.asarray(row[0]).reshape(-1)
        if ends.size == 0 or ends[0] < 1 or ends[-1] > row_length or (ends.size > 1 and (np.diff(ends) <= 0).any()):
            raise DataError(f"{files[0]}{' (and other shards)' if len(files) > 1 else ''}: record {index}: "
                            f"{PACKED_COLUMN} {ends.tolist()} is not increasing offsets within the row of "
                            f"{row_length} tokens")
        most = max(most, ends.size)
    return most
