"""JSON → MindRecord: `conversations` (reading records), `alpaca` (the converter), `preprocess`
(qa/wiki tokenization), `mindrecord` (atomic shard writer and reader), `schema` (shared with
the trainer's reader)."""
