"""Preference tuning (stage: dpo): one step's loss, metrics and gradients equal TRL's on the same
tiny model and pairs; the LoRA reference is the base with its adapters off (TRL's PEFT path);
precomputed reference log-probabilities equal live ones; pairwise data learns exactly each reply.

TRL references: `DPOTrainer.compute_loss` driven on a batch (sigmoid, hinge, ipo); for orpo and
simpo, TRL's own loss functions (`ORPOTrainer.odds_ratio_loss`, `CPOTrainer.cpo_loss` with
`get_batch_logps`) on logits computed by transformers, summed as LLaMA-Factory's
`compute_preference_loss` does (orpo: -avg logp of chosen + β·odds-ratio term).
"""
import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
import mindspore as ms  # noqa: E402

from llama_reference import mindsft_twin, random_hf_llama  # noqa: E402
from mindsft.data.schema import PAIR_COLUMNS  # noqa: E402
from mindsft.models.families import hf_to_ms_arrays, model_config_from_hf  # noqa: E402
from mindsft.train.preference import (LiveReference, PreferenceLoss, PreferenceSettings,  # noqa: E402
                                      PrecomputedReference, metrics_of)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97
# Three pairs, right-padded to one length: (prompt, chosen reply, rejected reply); each reply
# ends with its end token (id 2), as pairwise records are written.
PAIRS = [([1, 11, 12, 13], [21, 22, 23, 2], [31, 2]),
         ([1, 14, 15], [24, 25, 2], [32, 33, 34, 35, 2]),
         ([1, 16, 17, 18, 19, 20], [26, 2], [36, 37, 2])]
LENGTH = 12


@pytest.fixture(autouse=True)
def mindspore_mode_restored():
    """The tests pick graph or PyNative mode; the next test file finds the mode it started with."""
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


def pair_batch():
    """Our columns ([B, LENGTH] each) and TRL's batch (chosen rows over rejected ones)."""
    ours = {name: np.zeros((len(PAIRS), LENGTH), np.int32) for name in PAIR_COLUMNS}
    for name in ("chosen_labels", "rejected_labels"):
        ours[name][:] = -100
    for row, (prompt, chosen, rejected) in enumerate(PAIRS):
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            ids = prompt + reply
            ours[f"{side}_input_ids"][row, :len(ids)] = ids
            ours[f"{side}_labels"][row, len(prompt):len(ids)] = reply
    ids = np.concatenate([ours["chosen_input_ids"], ours["rejected_input_ids"]])
    labels = np.concatenate([ours["chosen_labels"], ours["rejected_labels"]])
    lengths = [len(p) + len(c) for p, c, _ in PAIRS] + [len(p) + len(r) for p, _, r in PAIRS]
    trl_batch = {"input_ids": torch.from_numpy(ids).long(),
                 "attention_mask": (torch.arange(LENGTH)[None] < torch.tensor(lengths)[:, None]).long(),
                 "completion_mask": torch.from_numpy(labels != -100).long()}
    return ours, trl_batch


def perturbed(model, seed=1, scale=0.05):
    """A copy of `model` with every weight moved a little: the policy after some training."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return policy.train()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w2", pad_token="w0", bos_token="w1")


def trl_dpo(policy, reference, loss_type, beta, tmp_path, peft_config=None):
    """TRL's DPOTrainer on `policy` (a reference model, or None and a `peft_config`: a new adapter
    whose reference is the model with the adapters disabled)."""
    from datasets import Dataset
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), report_to=[],
                         beta=beta, loss_type=[loss_type], use_cpu=True, max_length=None,
                         bf16=False)  # TRL defaults to bf16 autocast; the comparison is fp32
    dataset = Dataset.from_list([{"prompt": "w5", "chosen": " w6", "rejected": " w7"}] * 4)
    return trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                          processing_class=word_tokenizer(), peft_config=peft_config)


def our_step(loss_cell, batch):
    """(mean loss, metrics, {parameter name: gradient}) of one batch, as TrainStep normalises it."""
    from mindsft.train.step import tensors_of
    columns = tensors_of(batch, loss_cell.batch_columns)
    params = loss_cell.model.trainable_params()

    def mean_loss(*columns):
        loss_sum, count, _ = loss_cell.loss_terms(*columns)
        return loss_sum / count

    loss, grads = ms.value_and_grad(mean_loss, None, params)(*columns)
    _, _, statistics = loss_cell.loss_terms(*columns)
    return float(loss.asnumpy()), metrics_of(statistics.asnumpy()), \
        {p.name: g.asnumpy() for p, g in zip(params, grads)}


def hf_gradients_as_ours(hf_model, config):
    grads = {name: param.grad.detach().numpy() for name, param in hf_model.named_parameters()
             if param.grad is not None}
    return hf_to_ms_arrays(grads, config)


def assert_close_gradients(ours, expected, tolerance=1e-5):
    assert set(ours) == set(expected)
    for name, grad in ours.items():
        scale = max(np.abs(expected[name]).max(), 1e-3)
        assert np.abs(grad - expected[name]).max() / scale <= tolerance, name


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_metrics_and_gradients_equal_trl(loss_type, tmp_path):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    reference = random_hf_llama(vocab_size=VOCAB)
    policy = perturbed(reference)
    beta = 0.1
    trainer = trl_dpo(policy, copy.deepcopy(reference), loss_type, beta, tmp_path)
    ours_batch, trl_batch = pair_batch()
    policy.zero_grad()
    expected_loss = trainer.compute_loss(policy, trl_batch)
    expected_loss.backward()
    expected_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours_policy, ours_reference = mindsft_twin(policy), mindsft_twin(reference)
    live = LiveReference(ours_reference)
    live.fill(ours_batch)
    loss_cell = PreferenceLoss(ours_policy, PreferenceSettings(pref_loss=loss_type, pref_beta=beta))
    loss, metrics, grads = our_step(loss_cell, ours_batch)

    assert loss == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-5)
    assert abs(metrics["rewards/margins"]) > 1e-2  # the policy is not the reference: a real comparison
    for name, value in metrics.items():
        assert value == pytest.approx(expected_metrics[name], rel=1e-5, abs=1e-5), name
    assert_close_gradients(grads, hf_gradients_as_ours(policy, model_config_from_hf(policy.config.to_dict())))


def test_dpo_label_smoothing_is_the_conservative_dpo_loss():
    """cDPO (LLaMA-Factory's dpo_label_smoothing), checked against TRL's sigmoid form in CPO."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    reference = random_hf_llama(vocab_size=VOCAB)
    policy = perturbed(reference)
    ours_batch, _ = pair_batch()
    live = LiveReference(mindsft_twin(reference))
    live.fill(ours_batch)
    settings = PreferenceSettings(pref_loss="sigmoid", pref_beta=0.3, dpo_label_smoothing=0.2)
    loss, _, _ = our_step(PreferenceLoss(mindsft_twin(policy), settings), ours_batch)
    ours_policy = LiveReference(mindsft_twin(policy))(ours_batch)
    logits = torch.from_numpy((ours_policy[0] - ours_batch["ref_chosen_logps"])
                              - (ours_policy[1] - ours_batch["ref_rejected_logps"]))
    cpo = types.SimpleNamespace(alpha=0.0, beta=0.3, label_smoothing=0.2, loss_type="sigmoid",
                                accelerator=types.SimpleNamespace(device="cpu"))
    # cpo_loss(a, b) takes the log-ratio difference as a - b.
    from trl.experimental.cpo import CPOTrainer
    losses, _, _ = CPOTrainer.cpo_loss(cpo, logits, torch.zeros_like(logits))
    assert loss == pytest.approx(losses.mean().item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_losses_equal_trl_cpo_and_orpo_formulas(loss_type):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    ms.set_context(mode=ms.PYNATIVE_MODE)
    policy = perturbed(random_hf_llama(vocab_size=VOCAB))
    beta, gamma = 0.25, 0.7
    ours_batch, trl_batch = pair_batch()
    policy.zero_grad()
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    logits = policy(trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"]).logits
    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen, rejected = logps.chunk(2)
    trainer = types.SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=0.0, loss_type=loss_type,
                                    simpo_gamma=gamma, accelerator=types.SimpleNamespace(device="cpu"))
    if loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    else:
        # LLaMA-Factory's orpo: the SFT term on the chosen reply minus TRL's β·logσ(log odds).
        odds, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
        losses = -chosen - odds
    expected = losses.mean()
    expected.backward()

    settings = PreferenceSettings(pref_loss=loss_type, pref_beta=beta, simpo_gamma=gamma)
    loss, metrics, grads = our_step(PreferenceLoss(mindsft_twin(policy), settings), ours_batch)
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx((chosen_rewards > rejected_rewards).float().mean().item())
    assert metrics["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert_close_gradients(grads, hf_gradients_as_ours(policy, model_config_from_hf(policy.config.to_dict())))


def test_lora_reference_is_the_base_with_adapters_off_as_trl_peft_path(tmp_path):
    """Loss, metrics and adapter gradients of a LoRA DPO step equal TRL's with a new adapter, whose
    reference is the model with its adapters disabled."""
    import peft
    from mindsft.convert.peft import hf_module_of
    from mindsft.lora import LORA_A, LORA_B, load_peft_adapter
    ms.set_context(mode=ms.GRAPH_MODE)
    base = random_hf_llama(vocab_size=VOCAB)
    trainer = trl_dpo(copy.deepcopy(base), None, "sigmoid", 0.1, tmp_path, peft_config=peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config  # the disabled-adapter path
    # The adapter after some training (B moved off zero), so the policy is not its reference.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    trainer.model.save_pretrained(tmp_path / "adapter")
    ours_batch, trl_batch = pair_batch()
    trainer.model.zero_grad()
    expected_loss = trainer.compute_loss(trainer.model, trl_batch)
    expected_loss.backward()
    expected_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    expected_grads = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            module = name[len("base_model.model."):].rsplit(".lora_", 1)[0]
            expected_grads[(module, LORA_A if ".lora_A." in name else LORA_B)] = param.grad.numpy()

    ours = mindsft_twin(base)
    load_peft_adapter(ours, tmp_path / "adapter")
    live = LiveReference(ours, adapters_off=True)
    live.fill(ours_batch)
    # Off for the reference graph, on again for the policy's: the two graphs are built apart.
    np.testing.assert_allclose(ours_batch["ref_chosen_logps"],
                               LiveReference(mindsft_twin(base))(ours_batch)[0], rtol=1e-5)
    loss_cell = PreferenceLoss(ours, PreferenceSettings(pref_loss="sigmoid", pref_beta=0.1))
    from mindsft.train.step import EvalStep, tensors_of
    loss_sum, count, statistics = EvalStep(loss_cell)(*tensors_of(ours_batch, loss_cell.batch_columns))
    metrics = metrics_of(statistics.asnumpy())
    loss = float(loss_sum.asnumpy()) / float(count.asnumpy())
    assert loss == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-5)
    assert abs(metrics["rewards/margins"]) > 1e-3
    for name, value in metrics.items():
        assert value == pytest.approx(expected_metrics[name], rel=1e-5, abs=1e-5), name
    # The adapters' gradients of the step (the reference columns are constants of the batch).
    ms.set_context(mode=ms.PYNATIVE_MODE)
    _, _, grads = our_step(loss_cell, ours_batch)
    assert len(grads) == len(expected_grads) > 0
    for name, grad in grads.items():
        module, ab = name.rsplit(".", 1)
        want = expected_grads[(hf_module_of(module), ab)]
        assert np.abs(grad - want).max() / np.abs(want).max() <= 1e-5, name


def test_precomputed_reference_log_probs_equal_the_live_reference(tmp_path):
    from trainkit import write_pair_mindrecord
    from mindsft.train.batches import ShardedBatches
    from mindsft.train.preference import whole_dataset
    ms.set_context(mode=ms.GRAPH_MODE)
    write_pair_mindrecord(tmp_path / "pairs", num_records=7, vocab_size=VOCAB)
    live = LiveReference(mindsft_twin(random_hf_llama(vocab_size=VOCAB)))
    train = ShardedBatches(tmp_path / "pairs", 16, 2, shuffle=True, seed=3, drop_remainder=False)
    precomputed = PrecomputedReference.compute(live, whole_dataset(train, 3))
    precomputed.save(tmp_path / "reference_logps.npz")
    loaded, _ = PrecomputedReference.load(tmp_path / "reference_logps.npz", 7)
    for batch in train.epoch(0):
        batch = batch[0]
        expected = live(batch)
        loaded.fill(batch)
        real = batch["record_index"] >= 0
        np.testing.assert_allclose(batch["ref_chosen_logps"][real], expected[0][real], rtol=1e-6)
        np.testing.assert_allclose(batch["ref_rejected_logps"][real], expected[1][real], rtol=1e-6)


# ---- pairwise data -------------------------------------------------------------------------------

RECORD_FORMATS = {
    "alpaca": {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "A dog."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                   {"from": "human", "value": "Name a colour."}],
                 "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "A dog."}},
    "trl_plain": {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A dog."},
    "trl_conversational": {"prompt": [{"role": "user", "content": "Name a colour."}],
                           "chosen": [{"role": "assistant", "content": "Blue."}],
                           "rejected": [{"role": "assistant", "content": "A dog."}]},
    "trl_implicit_prompt": {"chosen": [{"role": "user", "content": "Name a colour."},
                                       {"role": "assistant", "content": "Blue."}],
                            "rejected": [{"role": "user", "content": "Name a colour."},
                                         {"role": "assistant", "content": "A dog."}]},
}


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    from tokenizer_helpers import write_bpe_tokenizer
    return write_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def preprocess_pairs(records_or_file, tokenizer, folder, seq_length=127, **options):
    from mindsft.data.preprocess import PreprocessOptions, preprocess
    if not isinstance(records_or_file, (str, Path)):
        path = Path(folder) / "pairs.json"
        Path(folder).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records_or_file))
        records_or_file = path
    stats = preprocess(PreprocessOptions(input_glob=str(records_or_file), model_file=str(tokenizer),
                                         output_file=str(Path(folder) / "out" / "pairs.mindrecord"),
                                         template="llama3", seq_length=seq_length, progress=False, **options))
    import mindspore.dataset as ds
    rows = list(ds.MindDataset(stats["output_files"], shuffle=False).create_dict_iterator(
        num_epochs=1, output_numpy=True))
    return stats, rows


@pytest.mark.parametrize("record_format", RECORD_FORMATS)
def test_each_side_learns_exactly_its_reply_and_end_token_after_the_same_prompt(record_format, bpe_tokenizer,
                                                                                tmp_path):
    from mindsft.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(bpe_tokenizer))
    stats, rows = preprocess_pairs([RECORD_FORMATS[record_format]], bpe_tokenizer, tmp_path)
    assert stats["dataset_type"] == "pairwise" and stats["records_written"] == 1  # detected from the fields
    row = rows[0]
    prompts = []
    for side, reply in (("chosen", "Blue."), ("rejected", "A dog.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        learned = np.nonzero(labels != -100)[0]
        assert np.array_equal(learned, np.arange(learned[0], learned[-1] + 1))  # one run: the final reply
        assert tokenizer.decode(ids[learned].tolist()) == reply + "<|eot_id|>"
        prompts.append(ids[:learned[0]].tolist())
    assert prompts[0] == prompts[1]
    if record_format == "sharegpt":  # the earlier assistant turn is context, not learned
        assert "Hello!" in tokenizer.decode(prompts[0])


def test_the_command_line_detects_pairs_and_says_so(bpe_tokenizer, tmp_path):
    from trainkit import run_python
    result = run_python(["--input_glob", str(ROOT / "mindsft" / "sample_data" / "pairwise_sample.json"),
                         "--model_file", str(bpe_tokenizer), "--template", "llama3", "--seq_length", "127",
                         "--output_file", str(tmp_path / "pairs.mindrecord"), "--no_progress"],
                        script=ROOT / "tools" / "llama_preprocess.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "preprocessed as --dataset_type pairwise" in result.stdout
    assert "Wrote 32 records of 128 tokens" in result.stdout


def test_overlong_pairs_cut_the_prompt_first_and_are_counted(bpe_tokenizer, tmp_path):
    record = {"prompt": "word " * 200, "chosen": "Blue.", "rejected": "A dog."}
    stats, rows = preprocess_pairs([record], bpe_tokenizer, tmp_path, seq_length=63)
    assert stats["truncated"] == 1 and stats["truncated_records"][0]["record"] == 0
    from mindsft.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(bpe_tokenizer))
    for side, reply in (("chosen", "Blue."), ("rejected", "A dog.")):
        labels = rows[0][f"{side}_labels"]
        assert tokenizer.decode(labels[labels != -100].tolist()) == reply + "<|eot_id|>"


def test_a_pair_without_a_prompt_is_one_clear_error(bpe_tokenizer, tmp_path):
    from mindsft.errors import DataError
    with pytest.raises(DataError, match=r"pairs.json: record 0: no prompt"):
        preprocess_pairs([{"chosen": "a", "rejected": "b"}], bpe_tokenizer, tmp_path)


def test_sample_pairs_mix_and_split_like_sft(bpe_tokenizer, tmp_path):
    sample = ROOT / "mindsft" / "sample_data" / "pairwise_sample.json"
    stats, rows = preprocess_pairs(sample, bpe_tokenizer, tmp_path, val_size=4)
    assert stats["records_written"] == 28 and stats["split"] == "train"
    assert (tmp_path / "out" / stats["eval_dataset_dir"]).is_dir()
    assert all(not np.array_equal(r["chosen_labels"], r["rejected_labels"]) for r in rows)


# ---- the training run ----------------------------------------------------------------------------

@pytest.mark.slow
def test_dpo_run_on_the_sample_raises_reward_accuracy_and_margin(bpe_tokenizer, tmp_path):
    """stage: dpo through run_mindformer.py on the shipped sample pairs: the reward accuracy and
    margin rise, metrics and eval metrics land in metrics.jsonl, and a precomputed reference trains
    exactly as the frozen copy does."""
    from trainkit import cli_args, run_python, write_start_checkpoint
    from mindsft.train.monitor import read_metrics
    sample = ROOT / "mindsft" / "sample_data" / "pairwise_sample.json"
    stats, _ = preprocess_pairs(sample, bpe_tokenizer, tmp_path / "data", val_size=4)
    write_start_checkpoint(tmp_path / "start.ckpt", vocab_size=700, seq_length=127)
    settings = {"stage": "dpo", "pref_beta": 0.5, "model.model_config.vocab_size": 700,
                "model.model_config.seq_length": 127, "runner_config.batch_size": 4, "runner_config.epochs": 4,
                "lr_schedule.type": "constant", "optimizer.learning_rate": 3e-3, "lr_schedule.learning_rate": 3e-3,
                "do_eval": True, "eval_step_interval": 7}
    runs = {}
    for name, extra in (("copy", {}), ("precomputed", {"precompute_ref_log_probs": True})):
        result = run_python(cli_args(tmp_path / name, tmp_path / "data" / "out", tmp_path / "start.ckpt",
                                     **settings, **extra))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    steps = [r for r in runs["copy"] if "loss" in r]
    evals = [r for r in runs["copy"] if "eval_loss" in r]
    assert len(steps) == 28 and len(evals) == 4
    first, last = steps[:7], steps[-7:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.1
    # Eval pairs are scored with the same loss and metrics (the sample's rejected replies are other
    # prompts' chosen ones, so held-out margins need not rise on 28 pairs).
    assert all(key in evals[-1] for key in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"))
    assert (tmp_path / "precomputed" / "reference_logps.npz").is_file()
    np.testing.assert_allclose([r["loss"] for r in runs["precomputed"] if "loss" in r],
                               [r["loss"] for r in steps], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"pref_loss": "sigmod"}, "pref_loss 'sigmod' is not one of sigmoid, hinge, ipo, orpo, simpo"),
    ({}, "holds no preference pairs (stage: dpo needs records written by llama_preprocess --dataset_type pairwise)"),
    ({"run_mode": "eval", "pairs": True}, "run_mode eval with stage dpo and pref_loss sigmoid needs a reference"),
])
def test_a_dpo_run_on_bad_settings_or_sft_data_is_one_clear_line(overrides, message, tmp_path):
    """Also: run_mode eval of full weights with a loss that needs a reference (none is loaded)."""
    from trainkit import cli_args, run_python, write_pair_mindrecord, write_qa_mindrecord, write_start_checkpoint
    overrides = dict(overrides)
    if overrides.pop("pairs", False):
        write_pair_mindrecord(tmp_path / "data", num_records=4)
        write_start_checkpoint(tmp_path / "start.ckpt")
        overrides.update({"eval_dataset.data_loader.dataset_dir": str(tmp_path / "data"),
                          "load_checkpoint": str(tmp_path / "start.ckpt")})
    else:
        write_qa_mindrecord(tmp_path / "data", num_records=4)
    result = run_python(cli_args(tmp_path / "out", tmp_path / "data", **{"stage": "dpo", **overrides}))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_run_mode_eval_of_pairs_reports_the_preference_loss_and_metrics(tmp_path):
    from trainkit import cli_args, run_python, write_pair_mindrecord, write_start_checkpoint
    write_pair_mindrecord(tmp_path / "pairs", num_records=5)
    write_start_checkpoint(tmp_path / "start.ckpt")
    result = run_python(cli_args(tmp_path / "out", tmp_path / "pairs", tmp_path / "start.ckpt", **{
        "stage": "dpo", "pref_loss": "orpo", "run_mode": "eval",
        "eval_dataset.data_loader.dataset_dir": str(tmp_path / "pairs")}))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["records"] == 5 and saved["eval_loss"] > 0
    assert saved["eval_rewards/chosen"] == pytest.approx(0.1 * saved["eval_logps/chosen"])  # orpo: β·avg logp
    assert "over 5 pairs" in result.stdout


@pytest.mark.parametrize("tokenizer_path, template", [("tokenizers/llama2/tokenizer.model", "vicuna_v1.1"),
                                                      ("tokenizers/llama3_1", "llama3"), ("tokenizers/qwen3", "qwen")])
def test_real_tokenizers_learn_each_reply_and_its_end_token_after_one_prompt(tokenizer_path, template):
    """Every sample pair with the real Llama 2 (SentencePiece), Llama 3.1 and Qwen3 (tokenizer.json)
    tokenizers: the learned tokens are the reply then the end token, after the same prompt ids."""
    from conftest import shared_file
    from mindsft.data.pairwise import encode_pair
    from mindsft.templates import get_template
    from mindsft.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(shared_file(tokenizer_path)))
    chat = get_template(template, None, tokenizer)
    for pair in json.loads((ROOT / "mindsft" / "sample_data" / "pairwise_sample.json").read_text()):
        row, outcome = encode_pair(tokenizer, chat, pair, 255, tokenizer.pad_id)
        assert outcome == "written"
        prompts = []
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            learned = np.nonzero(labels != -100)[0]
            assert ids[learned[-1]] == tokenizer.eos_id
            assert tokenizer.decode(ids[learned[:-1]].tolist()).strip() == pair[side]
            prompts.append(ids[:learned[0]].tolist())
        assert prompts[0] == prompts[1]


def test_qlora_reference_is_the_quantized_base_with_adapters_off(tmp_path):
    """QLoRA (nf4, double quantization): the adapters-off reference is what PEFT's `disable_adapter`
    computes on bitsandbytes' base, and the policy (adapters on) is not it."""
    from trl.experimental.cpo import CPOTrainer
    from test_qlora import CASES, SHAPE, ours_from, reference_qlora
    ms.set_context(mode=ms.GRAPH_MODE)
    random_hf_llama(vocab_size=VOCAB, **SHAPE).save_pretrained(tmp_path / "hf")
    quantization, bnb_settings = CASES["nf4_double_quant"]
    reference = reference_qlora(tmp_path / "hf", bnb_settings, tmp_path / "adapter")
    ours, _ = ours_from(tmp_path / "hf", quantization, tmp_path / "adapter")
    ours_batch, trl_batch = pair_batch()
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    with torch.no_grad(), reference.disable_adapter():
        logits = reference(trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"]).logits
    expected = CPOTrainer.get_batch_logps(logits, labels).numpy()
    chosen, rejected = LiveReference(ours, adapters_off=True)(ours_batch)
    np.testing.assert_allclose(np.concatenate([chosen, rejected]), expected, atol=2e-4, rtol=0)
    policy_chosen, _ = LiveReference(ours)(ours_batch)
    assert np.abs(policy_chosen - chosen).max() > 1e-2
