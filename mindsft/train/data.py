"""Reading MindRecord shards for training: one global sample order, each rank its slice.

The order of samples is a permutation of the whole dataset drawn from (seed, epoch), fixed
before anything is split. Global batch s is order[s*G:(s+1)*G]; accumulation micro-step k of
rank r takes its `batch_size` samples at offset (k*dp + r)*batch_size. So the set of samples in
an optimizer step does not depend on how many ranks or micro-steps share it, and resuming at
step s reads exactly what an uninterrupted run would have read.
"""
import numpy as np
import mindspore.dataset as ds

from mindsft.data.schema import mindrecord_files, record_length
from mindsft.errors import DataError


class ShardedBatches:
    """Micro-batches of one rank, in the global order above. Reads only this rank's records."""

    def __init__(self, dataset_dir, seq_length, batch_size, data_parallel=1, rank=0,
                 accumulation_steps=1, shuffle=True, seed=0, drop_remainder=True,
                 pad_token_id=0, ignore_index=-100, what="train_dataset"):
        if not dataset_dir:
            raise DataError(f"{what}.data_loader.dataset_dir is not set (give --{what}_dir)")
        try:
            self.files = mindrecord_files(dataset_dir)
        except DataError as exc:
            raise DataError(f"{what}: {exc}") from None
        self.dataset_dir = dataset_dir
        probe = ds.MindDataset(self.files, shuffle=False)
        self.num_records = probe.get_dataset_size()
        self.columns = [c for c in ("input_ids", "labels") if c in probe.get_col_names()]
        if "input_ids" not in self.columns:
            raise DataError(f"{dataset_dir}: records have no 'input_ids' column (columns: {probe.get_col_names()})")
        if self.num_records == 0:
            raise DataError(f"{dataset_dir}: the dataset is empty (0 records)")
        first = next(probe.create_dict_iterator(num_epochs=1, output_numpy=True))
        self.record_length = int(first["input_ids"].shape[0])
        if self.record_length != record_length(seq_length):
            raise DataError(f"{dataset_dir}: records hold {self.record_length} tokens but model seq_length "
                            f"{seq_length} needs {record_length(seq_length)} (seq_length + 1)")
        self.batch_size, self.data_parallel, self.rank = batch_size, data_parallel, rank
        self.accumulation_steps = accumulation_steps
        self.global_batch = batch_size * data_parallel * accumulation_steps
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        self.pad_token_id, self.ignore_index = pad_token_id, ignore_index
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
        """Yield, per optimizer step, a list of `accumulation_steps` (input_ids, labels) arrays."""
        indices = self.rank_indices(epoch, start_step)
        if indices.size == 0:
            return
        flat = indices.reshape(-1)
        padding = flat < 0
        # Padding slots (drop_remainder False) read record 0 and learn nothing from it.
        reader = ds.MindDataset(self.files, columns_list=self.columns,
                                sampler=ds.SubsetSampler(np.where(padding, 0, flat).tolist()), shuffle=None)
        reader = reader.batch(self.batch_size)
        micro = []
        padding = padding.reshape(-1, self.batch_size)
        for number, row in enumerate(reader.create_tuple_iterator(num_epochs=1, output_numpy=True)):
            input_ids, labels = self.learned_labels(row)
            labels[padding[number]] = self.ignore_index
            micro.append((input_ids, labels))
            if len(micro) == self.accumulation_steps:
                yield micro
                micro = []

    def learned_labels(self, row):
        """(input_ids, labels) int32; pretraining data learns every token; pad is never learned."""
        input_ids = np.asarray(row[0], np.int32)
        labels = np.asarray(row[1], np.int32).copy() if len(row) > 1 else input_ids.copy()
        # MindFormers masks targets where the record holds pad (id 0), labels column or not.
        labels[input_ids == self.pad_token_id] = self.ignore_index
        return input_ids, labels
