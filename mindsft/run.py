"""The run modes of `run_mindformer.py`: train and finetune (one recipe), eval, predict."""
from mindsft.config import RUN_MODES


def run(config):
    """Run `config.run_mode` on a loaded RunConfig; returns the mode's result mapping."""
    if config.no_effect:
        print(f"accepted for MindFormers compatibility, no effect here: {', '.join(config.no_effect)}")
    for note in config.notes:
        print(note)
    # Each mode's module imports MindSpore (seconds, ~480 MB): only the mode that runs loads it,
    # so a config error is reported before any of that.
    if config.run_mode in ("train", "finetune"):
        from mindsft.train.recipe import train  # deferred: MindSpore
        return train(config)
    if config.run_mode == "eval":
        from mindsft.train.evaluate import evaluate  # deferred: MindSpore
        return evaluate(config)
    assert config.run_mode in RUN_MODES
    from mindsft import predict  # deferred: MindSpore
    return predict.run(config)
